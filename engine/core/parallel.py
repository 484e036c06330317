"""Chunked kernels for holistic reductions over a [K, P] stack.

Holistic rules (median, trimmed mean, Krum, geometric median, Flag, ...) are written in terms
of three kernels that split the parameter axis P into fixed-width column chunks:

    columnwise(fn, x)  fn applied to every chunk x[:, lo:hi], results joined along the last axis
    gram(x)            x @ x.T in float64, summed chunk by chunk in chunk order
    combine(c, x)      c @ x: a few weighted combinations of the K rows

The chunk width is fixed, so the result never depends on who computes the chunks: the engine's
runtime may install a `ChunkMap` that sends chunks to parallel Ray tasks
(`engine.backends.runtime.RayChunkMap`), and the bits are those of the serial map used by default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol

import torch

CHUNK_COLUMNS = 1 << 15  # 32K columns: K=1000 float32 rows -> 128 MB per chunk

Span = tuple[int, int]
ChunkFn = Callable[[torch.Tensor], torch.Tensor]


class ChunkMap(Protocol):
    def __call__(self, fn: ChunkFn, x: torch.Tensor, spans: list[Span]) -> list[torch.Tensor]:
        """[fn(x[:, lo:hi]) for lo, hi in spans], in span order."""
        ...


def serial_map(fn: ChunkFn, x: torch.Tensor, spans: list[Span]) -> list[torch.Tensor]:
    """Chunks one after another, each as a contiguous copy (as a parallel map sees them)."""
    return [fn(x[:, lo:hi].contiguous()) for lo, hi in spans]


_MAP: ContextVar[ChunkMap] = ContextVar("chunk_map", default=serial_map)
_WIDTH: ContextVar[int] = ContextVar("chunk_columns", default=CHUNK_COLUMNS)


@contextmanager
def chunk_map(mapper: ChunkMap, chunk_columns: int | None = None) -> Iterator[None]:
    """Run the kernels in this block through `mapper` (and, for tests, another chunk width)."""
    tokens = [_MAP.set(mapper)]
    if chunk_columns is not None:
        tokens.append(_WIDTH.set(chunk_columns))
    try:
        yield
    finally:
        _MAP.reset(tokens[0])
        if len(tokens) > 1:
            _WIDTH.reset(tokens[1])


def spans(num_columns: int) -> list[Span]:
    width = _WIDTH.get()
    return [(lo, min(lo + width, num_columns)) for lo in range(0, num_columns, width)]


def columnwise(fn: ChunkFn, x: torch.Tensor) -> torch.Tensor:
    """fn over column chunks of x [K, P], joined along the last axis (fn must act per column)."""
    return torch.cat(_MAP.get()(fn, x, spans(x.shape[1])), dim=-1)


def _chunk_gram(chunk: torch.Tensor) -> torch.Tensor:
    c = chunk.double()
    return c @ c.T


def gram(x: torch.Tensor) -> torch.Tensor:
    """x @ x.T [K, K] in float64, summed over column chunks in order, made exactly
    symmetric: (G + G^T) / 2. A BLAS may compute G_ij and G_ji in different orders (seen with
    MKL's AVX2 path); distances, Krum scores and their ties must not depend on it."""
    parts = _MAP.get()(_chunk_gram, x, spans(x.shape[1]))
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return (total + total.T) / 2


def squared_distances(g: torch.Tensor) -> torch.Tensor:
    """Pairwise ||x_i - x_j||^2 [K, K] from the Gram matrix (clamped at 0, zero diagonal)."""
    diag = g.diagonal()
    d = (diag[:, None] + diag[None, :] - 2 * g).clamp_min(0)
    return d.fill_diagonal_(0)


class _Combine:
    """coeffs @ chunk in float64, cast back to the chunk's dtype (a picklable closure for Ray
    tasks).
    Rows whose coefficients are all zero are left out, not multiplied: 0 * inf would make a
    rule that excluded a non-finite row return NaN."""

    def __init__(self, coeffs: torch.Tensor) -> None:
        coeffs = coeffs.double()
        used = coeffs != 0 if coeffs.dim() == 1 else (coeffs != 0).any(dim=0)
        self.rows = None if bool(used.all()) else torch.nonzero(used).squeeze(1)
        self.coeffs = coeffs if self.rows is None else coeffs[..., self.rows]

    def __call__(self, chunk: torch.Tensor) -> torch.Tensor:
        rows = chunk if self.rows is None else chunk[self.rows]
        return (self.coeffs @ rows.double()).to(chunk.dtype)


def combine(coeffs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """coeffs [M, K] (or [K]) times x [K, P]: weighted combinations of the rows, in x's
    dtype."""
    return columnwise(_Combine(coeffs), x)

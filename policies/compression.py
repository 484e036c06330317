"""Client-side update compression with error feedback (pure torch).

A `Compressor` maps C clients' updates x [C, P] (float32) and one uint64 key per client to
`Compressed(values, bytes)`: `values` [C, P] is the update the server decodes (zeros where
nothing was sent), `bytes` [C] the wire size of each client's message. Every random draw of
row c comes from a torch Generator seeded by keys[c] alone, and every row is computed on its
own, so the result does not depend on which other rows are compressed with it or in which
order (the engine derives the keys from its seed tree: (run seed, stream, round, client id)).

Error feedback (Seide et al., 2014, "1-Bit Stochastic Gradient Descent and its Application to
Data-Parallel Distributed Training of Speech DNNs"; Stich et al., 2018, "Sparsified SGD with
Memory"; Karimireddy et al., 2019, "Error Feedback Fixes SignSGD and other Gradient Compression
Schemes") keeps what compression dropped and adds it back next time:
c = C(x + e), e' = x + e - c.

Each kind (registry COMPRESSORS) is a factory of its parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from functools import partial
from typing import Annotated, NamedTuple

import numpy as np
import torch
from pydantic import Field

from engine.core.plugins import Registry

FLOAT_BYTES = 4
INDEX_BYTES = 4
SEED_BYTES = 8

Ratio = Annotated[float, Field(gt=0, le=1)]
RowFn = Callable[[torch.Tensor, int], tuple[torch.Tensor, int]]  # (row [P], key) -> (row, bytes)


class Compressed(NamedTuple):
    values: torch.Tensor  # [C, P] float32: what the server decodes (zeros where not sent)
    bytes: np.ndarray  # [C] int64: wire bytes of each client's message


class Compressor(NamedTuple):
    compress: Callable[[torch.Tensor, np.ndarray], Compressed]
    lossless: bool = False  # sends the update as it is: error feedback has nothing to keep
    # unbiased kinds: omega(P) bounds the variance, E||C(x) - x||^2 <= omega ||x||^2
    # (compressed gossip scales them by 1 / (1 + omega) to make them contractive)
    omega: Callable[[int], float] | None = None

    def contraction(self, num_params: int) -> float:
        """The factor CHOCO-SGD applies to this compressor's messages: 1 / (1 + omega) for
        an unbiased one (Koloskova et al., 2019, use QSGD so scaled), else 1."""
        return 1.0 if self.omega is None else 1.0 / (1.0 + self.omega(num_params))


def _rowwise(row_fn: RowFn, x: torch.Tensor, keys: np.ndarray) -> Compressed:
    """Apply `row_fn` to each row with its own key (rows never see each other)."""
    if x.dim() != 2 or x.dtype != torch.float32:
        raise ValueError(f"compress: expected float32 [C, P], got {x.dtype} {tuple(x.shape)}")
    keys = np.asarray(keys, dtype=np.uint64)
    if keys.shape != (x.shape[0],):
        raise ValueError(f"compress: {x.shape[0]} rows need {x.shape[0]} keys, got {keys.shape}")
    values = torch.zeros_like(x)
    sizes = np.zeros(x.shape[0], dtype=np.int64)
    for c in range(x.shape[0]):
        values[c], sizes[c] = row_fn(x[c].contiguous(), int(keys[c]))
    return Compressed(values, sizes)


def _generator(key: int) -> torch.Generator:
    return torch.Generator().manual_seed(key)


def _uniform(key: int, n: int) -> torch.Tensor:
    """n float64 uniforms in [0, 1) keyed by `key` (stochastic rounding)."""
    return torch.rand(n, generator=_generator(key), dtype=torch.float64)


def kept_count(ratio: float, num_params: int) -> int:
    """k = max(1, ceil(ratio * P)), with ratio read as the decimal it was written as
    (0.1 * 30 is 3, not ceil(3.0000000000000004) = 4)."""
    return min(num_params, max(1, math.ceil(Fraction(repr(float(ratio))) * num_params)))


# ---------------------------------------------------------------- row functions


def _identity_row(x: torch.Tensor, key: int) -> tuple[torch.Tensor, int]:
    return x.clone(), FLOAT_BYTES * x.numel()


def top_indices(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries; among equal values the lower index first."""
    threshold = torch.topk(magnitude, k, sorted=True).values[-1]
    above = magnitude > threshold
    tied = magnitude == threshold
    room = k - int(above.sum())
    take = above | (tied & (torch.cumsum(tied, 0) <= room))
    return torch.nonzero(take).squeeze(1)


def _topk_row(ratio: float, x: torch.Tensor, key: int) -> tuple[torch.Tensor, int]:
    k = kept_count(ratio, x.numel())
    index = top_indices(x.abs(), k)
    out = torch.zeros_like(x)
    out[index] = x[index]
    return out, k * (FLOAT_BYTES + INDEX_BYTES)


def _randomk_row(ratio: float, unbiased: bool, x: torch.Tensor,
                 key: int) -> tuple[torch.Tensor, int]:
    p = x.numel()
    k = kept_count(ratio, p)
    index = torch.randperm(p, generator=_generator(key))[:k]
    out = torch.zeros_like(x)
    out[index] = x[index] * (p / k) if unbiased else x[index]
    return out, FLOAT_BYTES * k + SEED_BYTES


def _quantize8_row(x: torch.Tensor, key: int) -> tuple[torch.Tensor, int]:
    lo, hi = x.min().double(), x.max().double()  # sent as float32: exact in float64
    step = (hi - lo) / 255
    if step <= 0:
        return x.clone(), x.numel() + 2 * FLOAT_BYTES
    level = (x.double() - lo) / step
    code = torch.floor(level + _uniform(key, x.numel())).clamp_(0, 255)  # the uint8 sent
    return (lo + code * step).float(), x.numel() + 2 * FLOAT_BYTES


def qsgd_bytes(num_params: int, levels: int) -> int:
    """One float32 norm, then per coordinate one sign bit and a ceil(log2(s + 1))-bit level,
    packed (fixed-width codes, no Elias coding)."""
    bits = 1 + math.ceil(math.log2(levels + 1))
    return FLOAT_BYTES + math.ceil(num_params * bits / 8)


def _qsgd_row(levels: int, x: torch.Tensor, key: int) -> tuple[torch.Tensor, int]:
    size = qsgd_bytes(x.numel(), levels)
    norm = torch.linalg.vector_norm(x.double()).float().double()  # sent as float32
    if norm == 0:
        return torch.zeros_like(x), size
    scaled = x.double().abs() / norm * levels
    code = torch.floor(scaled + _uniform(key, x.numel())).clamp_(0, levels)
    return (norm * torch.sign(x.double()) * code / levels).float(), size


def _sign_row(x: torch.Tensor, key: int) -> tuple[torch.Tensor, int]:
    scale = (x.double().abs().sum() / x.numel()).float()  # sent as float32
    return scale * torch.sign(x), math.ceil(x.numel() / 8) + FLOAT_BYTES


# ---------------------------------------------------------------- factories


def none() -> Compressor:
    """No compression: the float32 update as it is, 4P bytes (the baseline of McMahan et al.,
    2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data")."""
    return Compressor(partial(_rowwise, _identity_row), lossless=True)


def topk(ratio: Ratio = 0.01) -> Compressor:
    """Top-k sparsification (Aji & Heafield, 2017, "Sparse Communication for Distributed
    Gradient Descent"; Stich et al., 2018, "Sparsified SGD with Memory"): keep the
    k = max(1, ceil(ratio * P)) entries of largest magnitude of each row (ties: the lower index),
    sent as k (float32 value, int32 index) pairs: 8k bytes."""
    return Compressor(partial(_rowwise, partial(_topk_row, ratio)))


def randomk(ratio: Ratio = 0.01, unbiased: bool = False) -> Compressor:
    """Random-k sparsification (Stich et al., 2018, "Sparsified SGD with Memory"): k =
    max(1, ceil(ratio * P)) coordinates drawn without replacement from the client's key. The
    server regenerates them from the 8-byte seed, so the message is 4k + 8 bytes. Values are
    scaled by P / k only when `unbiased` (Wangni et al., 2018); with error feedback the paper
    sends them unscaled, the default."""
    omega = (lambda p: p / kept_count(ratio, p) - 1.0) if unbiased else None
    return Compressor(partial(_rowwise, partial(_randomk_row, ratio, unbiased)), omega=omega)


def quantize8() -> Compressor:
    """8-bit uniform quantization of each row on [min, max] with stochastic rounding, which is
    unbiased (the uniform-level scheme of Alistarh et al., 2017, "QSGD", with min/max instead of
    the norm as the range): 1 byte per coordinate plus the float32 min and max, P + 8 bytes."""
    return Compressor(partial(_rowwise, _quantize8_row))


def qsgd(levels: Annotated[int, Field(ge=1)] = 16) -> Compressor:
    """QSGD (Alistarh et al., 2017, "QSGD: Communication-Efficient SGD via Gradient Quantization
    and Encoding"): Q_s(x)_i = ||x||_2 * sign(x_i) * xi_i(x, s), where xi_i is |x_i| / ||x|| * s
    rounded stochastically to a neighbouring integer l or l + 1 (up with probability
    |x_i| / ||x|| * s - l), then divided by s; unbiased. Encoding (no Elias coding): a float32
    norm, one sign bit and a ceil(log2(s + 1))-bit level per coordinate, packed:
    4 + ceil(P * (1 + ceil(log2(s + 1))) / 8) bytes."""
    return Compressor(partial(_rowwise, partial(_qsgd_row, levels)),  # Alistarh et al. Lemma 3.1
                      omega=partial(_qsgd_omega, levels))


def _qsgd_omega(levels: int, num_params: int) -> float:
    return min(num_params / levels**2, math.sqrt(num_params) / levels)


def sign() -> Compressor:
    """Scaled sign compression of EF-signSGD (Karimireddy et al., 2019, "Error Feedback Fixes
    SignSGD and other Gradient Compression Schemes"): (||x||_1 / P) * sign(x); one bit per
    coordinate plus the float32 scale, ceil(P / 8) + 4 bytes (a coordinate that is exactly 0
    decodes as 0 here, as torch.sign gives)."""
    return Compressor(partial(_rowwise, _sign_row))


COMPRESSORS: Registry[Compressor] = Registry("compressor", {
    "none": none, "topk": topk, "randomk": randomk, "quantize8": quantize8, "qsgd": qsgd,
    "sign": sign,
})


def with_error_feedback(compressor: Compressor, x: torch.Tensor, residual: torch.Tensor | None,
                        keys: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Error feedback (Seide et al., 2014; Stich et al., 2018; Karimireddy et al., 2019):
    c = C(x + e), e' = x + e - c. `residual` e [C, P] is the clients' memory (None: zeros).
    Returns (c, e', wire bytes [C]); over any number of rounds, the sum of what was sent plus
    the last residual equals the sum of the inputs."""
    corrected = x if residual is None else x + residual
    sent = compressor.compress(corrected, keys)
    return sent.values, corrected - sent.values, sent.bytes


class ControlledUplink(NamedTuple):
    """SCALLION and SCAFCOM's client message (Huang, Li & Li, 2024, "Stochastic Controlled
    Averaging for Federated Learning with Communication Compression", ICLR; arXiv
    2308.08165). Their SCAFFOLD form uploads one vector: with g_i the client's mean corrected
    local gradient, SCAFFOLD option II's c_i+ - c_i = g_i - c_i is all the server needs
    (x += -eta K (c + mean_i of it), c += (1/N) sum_i of it). They compress it:
      SCALLION (unbiased C):  d_i = C(g_i - c_i),  c_i += alpha d_i;
      SCAFCOM (biased C):     v_i = (1 - beta) v_i + beta g_i,  d_i = C(v_i - c_i),  c_i += d_i.
    Both are the one rule below with (alpha, beta) = (alpha, 1) or (1, beta); SCAFCOM scales
    an unbiased compressor by 1 / (1 + omega) (`contract`, as compressed gossip does) so
    that it is contractive, which its analysis assumes."""

    alpha: float | None = None  # the step on c_i (SCALLION's alpha; None: 1 / (1 + omega),
    # the paper's choice for an unbiased compressor, 1 for a lossless one; SCAFCOM: 1)
    beta: float = 1.0  # the momentum weight on g_i (SCAFCOM's beta; 1: no momentum, SCALLION)
    contract: bool = False  # scale the message by compressor.contraction(P) (SCAFCOM)

    @property
    def momentum(self) -> bool:
        return self.beta < 1

    def message(self, compressor: Compressor, drift: torch.Tensor, control: torch.Tensor,
                momentum: torch.Tensor | None, keys: np.ndarray):
        """`drift` [C, P]: g_i - c_i (SCAFFOLD option II's change of c_i); `control`: c_i;
        `momentum`: v_i when beta < 1. Returns (d_i as the server decodes it, the change of
        c_i, the new v_i or None, wire bytes [C])."""
        if momentum is not None:
            momentum = (1 - self.beta) * momentum + self.beta * (control + drift)
            drift = momentum - control
        sent = compressor.compress(drift, keys)
        values = sent.values
        if self.contract:
            values = compressor.contraction(drift.shape[1]) * values
        alpha = compressor.contraction(drift.shape[1]) if self.alpha is None else self.alpha
        return values, alpha * values, momentum, sent.bytes

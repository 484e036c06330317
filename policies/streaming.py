"""Streaming DiLoCo (Douillard et al., 2025, "Streaming DiLoCo with overlapping
communication"): the model's parameters in P fragments, one fragment synchronised per round
at a staggered offset, the workers' outer gradients quantised to 4 bits before averaging,
an outer Nesterov step per fragment, and the merged fragment mixed into each worker's own
parameters tau rounds later with a mixing factor alpha.

This module is the pure part: the fragments of the flat vector, which one round r
synchronises, the FP4 (E3M0) quantiser, and the outer step per fragment. The workers'
own parameters live in the client pools (engine/compute/pool.py, `training.streaming`).

Departures from the paper: fragments are contiguous, near-equal slices of the flat
parameter vector (the paper's are groups of transformer layers, strided or sequential);
time is counted in rounds (a round is H / P inner steps, so a fragment is synchronised every
H inner steps, and the overlap tau is a number of rounds, not of inner steps); the
fragment of a round is the round's index mod P on the pools and the outer steps' count mod
P at the server, which agree as long as no round is skipped (a round with no update).
"""

from __future__ import annotations

from typing import Annotated, NamedTuple

import torch
from pydantic import Field

from policies.base import Aggregator, stage
from policies.optimizers import Beta, Positive, _momentum

E3M0_LEVELS = 7  # magnitudes 2^-6 .. 2^0 of the scale, and zero


class Streaming(NamedTuple):
    """How the workers synchronise: `fragments` P, the overlap `tau` (rounds between a
    fragment's outer step and its merge into the workers), the mixing factor `alpha` of
    the merge (own <- alpha own + (1 - alpha) global), `bits` of the outer gradients sent
    (4: FP4 E3M0; 32: unquantised)."""

    fragments: int = 1
    tau: int = 0
    alpha: float = 0.0
    bits: int = 4


def fragment_bounds(size: int, fragments: int, p: int) -> tuple[int, int]:
    """[lo, hi) of fragment p of a flat vector of `size`: P contiguous slices whose sizes
    differ by at most one (the first size % P are the longer)."""
    base, extra = divmod(size, fragments)
    lo = p * base + min(p, extra)
    return lo, lo + base + (p < extra)


def fragment_of_round(r: int, fragments: int) -> int:
    """The fragment synchronised at the end of round r (staggered: one per round)."""
    return r % fragments


def fragment_bytes(size: int, fragments: int, bits: int) -> int:
    """Wire bytes of the largest fragment at `bits` per value, plus its float32 scale
    when quantised."""
    longest = -(-size // fragments)
    return longest * 4 if bits == 32 else -(-longest * bits // 8) + 4


def quantize_e3m0(x: torch.Tensor) -> torch.Tensor:
    """FP4 E3M0 per row (the paper's 4-bit format: a sign, 3 exponent bits, no mantissa):
    each row scaled by its largest magnitude s, each value rounded to the nearest of
    {0, s 2^-6, ..., s 2^-1, s} (ties to the smaller), its sign kept. Returns the
    dequantised values (what the receiver averages)."""
    s = x.abs().amax(dim=-1, keepdim=True)
    m = x.abs() / torch.where(s > 0, s, 1.0)
    k = torch.floor(torch.log2(m.clamp(min=2.0 ** -(E3M0_LEVELS + 1)))).clamp(
        -E3M0_LEVELS, 0)
    lo = torch.where(k < -(E3M0_LEVELS - 1), 0.0, torch.exp2(k))
    hi = torch.where(k < -(E3M0_LEVELS - 1), 2.0 ** -(E3M0_LEVELS - 1), torch.exp2(k + 1))
    q = torch.where(m - lo <= hi - m, lo, hi).clamp(max=1.0)
    return torch.sign(x) * q * s


def quantized(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The values as sent with `bits` (4: E3M0; 32: as they are)."""
    return x if bits == 32 else quantize_e3m0(x)


@stage("optimizer")
def streaming_diloco_outer(lr: Positive = 0.7, momentum: Beta = 0.9,
                           fragments: Annotated[int, Field(ge=1)] = 1) -> Aggregator:
    """Streaming DiLoCo's outer step (Douillard et al., 2025): DiLoCo's Nesterov outer
    optimizer (`diloco_outer`, lr 0.7, momentum 0.9) applied to one fragment per step, each
    fragment with its own momentum buffer; the step is zero off the fragment. Outer step t
    updates fragment t mod P (`fragments`, filled from training.streaming; 1 without it,
    which is `diloco_outer`)."""
    inner = _momentum(lr, momentum, nesterov=True)

    def init(params: torch.Tensor) -> tuple:
        bounds = [fragment_bounds(params.numel(), fragments, p) for p in range(fragments)]
        return (tuple(inner.init(params[lo:hi])[0] for lo, hi in bounds),
                torch.zeros((), dtype=torch.int64))

    def update(delta: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple]:
        buffers, t = state
        p = fragment_of_round(int(t), fragments)
        lo, hi = fragment_bounds(delta.numel(), fragments, p)
        part, (buf,) = inner.update(delta[lo:hi], (buffers[p],))
        step = torch.zeros_like(delta)
        step[lo:hi] = part
        return step, (buffers[:p] + (buf,) + buffers[p + 1:], t + 1)

    return Aggregator(init, update)

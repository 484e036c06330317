"""Supermask layers: fixed random weights, trained edge scores, a top-k% mask per layer.

Edge-popup (Ramanujan et al., "What's Hidden in a Randomly Weighted Neural Network?", CVPR
2020) as FRL uses it (Mozaffari, Shejwalkar & Houmansadr, "Every Vote Counts: Ranking-Based
Training of Federated Learning to Resist Poisoning Attacks", USENIX Security 2023; code:
SPIN-UMass/FRL, models/modules.py `MaskConv`, models/module_util.py `GetSubnet`,
models/init.py `signed_constant`):

- weights are frozen at signed constants, sign(random) * gain / sqrt(fan_in) with the ReLU gain
  sqrt(2), and layers have no bias (FRL builds every layer with bias=False);
- every weight has a score, initialised like a default torch layer weight (Kaiming uniform with
  a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))); the scores are the only parameters;
- the forward pass uses weight * mask, where the mask keeps a layer's edges with the highest
  |score| (FRL's `GetSubnet` on `scores.abs()`): the floor((1 - keep) n) lowest are dropped;
- the mask's gradient goes straight through to |score| (edge-popup), so a score's gradient is
  dL/d(mask) * sign(score) with dL/d(mask) = dL/d(masked weight) * weight.

The weights are buffers drawn from a private generator seeded by `weight_seed`, so the driver,
every pool and the evaluator build the same random network; the scores come from torch's
global RNG, which `engine.core.params.init_params` seeds. The mask is computed with sorts only (no
in-place writes), so it works under torch.func.vmap + functional_call and with plain autograd.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def top_edges_mask(scores: torch.Tensor, keep: float, by_magnitude: bool = True) -> torch.Tensor:
    """0/1 mask of a layer's kept edges with edge-popup's straight-through gradient.

    Edges are ranked by |score| (or by the signed score when `by_magnitude` is False); the
    floor((1 - keep) * n) lowest are dropped, as FRL's `GetSubnet` does (ties: the lower index
    is dropped first). The value is exactly 0 or 1; d(mask)/d(ranked value) is the identity."""
    ranked = scores.abs() if by_magnitude else scores
    flat = ranked.reshape(-1)
    dropped = int((1 - keep) * flat.numel())
    position = torch.argsort(torch.argsort(flat, stable=True), stable=True)  # 0 = lowest
    hard = (position >= dropped).to(ranked.dtype).reshape(ranked.shape)
    return hard + (ranked - ranked.detach())  # + 0 in value, identity in gradient


def _signed_constant(shape: tuple[int, ...], fan_in: int,
                     generator: torch.Generator) -> torch.Tensor:
    signs = torch.randint(0, 2, shape, generator=generator).float() * 2 - 1
    return signs * (math.sqrt(2.0) / math.sqrt(fan_in))


class _Supermasked(nn.Module):
    """A weight tensor of fixed signed constants (buffer) and its trained scores (parameter)."""

    def __init__(self, shape: tuple[int, ...], keep: float, by_magnitude: bool,
                 generator: torch.Generator) -> None:
        super().__init__()
        fan_in = math.prod(shape[1:])
        self.keep, self.by_magnitude = keep, by_magnitude
        self.scores = nn.Parameter(torch.empty(shape))
        nn.init.kaiming_uniform_(self.scores, a=math.sqrt(5))
        self.register_buffer("weight", _signed_constant(shape, fan_in, generator))

    def masked_weight(self) -> torch.Tensor:
        return self.weight * top_edges_mask(self.scores, self.keep, self.by_magnitude)


class SupermaskLinear(_Supermasked):
    def __init__(self, in_features: int, out_features: int, keep: float, by_magnitude: bool,
                 generator: torch.Generator) -> None:
        super().__init__((out_features, in_features), keep, by_magnitude, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight())


class SupermaskConv2d(_Supermasked):
    """A 3x3 convolution with padding 1 (the shape the dense CNN uses)."""

    def __init__(self, in_channels: int, out_channels: int, keep: float, by_magnitude: bool,
                 generator: torch.Generator) -> None:
        super().__init__((out_channels, in_channels, 3, 3), keep, by_magnitude, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.masked_weight(), padding=1)

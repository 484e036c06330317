"""Flat parameter vectors: a model's parameters are one float32 tensor [P]."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ParamSpec:
    """Maps a flat vector [P] to the named parameter views `functional_call` expects."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, module: nn.Module) -> ParamSpec:
        named = list(module.named_parameters())
        return cls(tuple(n for n, _ in named), tuple(p.shape for _, p in named))

    @property
    def size(self) -> int:
        return sum(s.numel() for s in self.shapes)

    def spans(self) -> tuple[tuple[int, int], ...]:
        """(start, stop) of each parameter tensor (a layer's weight, its bias) in the vector."""
        stops = torch.tensor([s.numel() for s in self.shapes]).cumsum(0).tolist()
        return tuple(zip([0, *stops[:-1]], stops, strict=True))

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views into `flat` (works on a per-client slice under vmap)."""
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            n = shape.numel()
            out[name] = flat[offset : offset + n].view(shape)
            offset += n
        return out


def flatten_module(module: nn.Module) -> torch.Tensor:
    """The module's current parameters as one detached float32 vector [P]."""
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).float()


def init_params(module_factory, seed: int) -> torch.Tensor:
    """Build a model with torch's default init under a private seeded RNG; return [P]."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return flatten_module(module_factory())

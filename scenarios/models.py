"""Models over flat inputs: logistic regression, MLP, and a small CNN for image tasks, each
dense or as a supermask model (scenarios/supermask.py: fixed random weights, trained scores)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from engine.core.config import ModelConfig
from engine.core.errors import ConfigError
from scenarios.supermask import SupermaskConv2d, SupermaskLinear

Layer = Callable[[int, int], nn.Module]  # (inputs, outputs) -> a linear or 3x3 conv layer


class Reshape(nn.Module):
    """Flat features [B, F] -> [B, *shape] (batch-dim agnostic, so it works under vmap)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)


def _mlp(features: int, hidden: list[int], classes: int, linear: Layer) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [linear(features, width), nn.ReLU()]
        features = width
    return [*layers, linear(features, classes)]


def _conv3x3(inputs: int, outputs: int) -> nn.Module:
    return nn.Conv2d(inputs, outputs, 3, padding=1)


def _cnn(shape: tuple[int, ...], classes: int, linear: Layer, conv: Layer) -> list[nn.Module]:
    if len(shape) != 3:
        raise ConfigError(f"task.model.kind: cnn needs image inputs (C, H, W); got shape {shape}")
    c, h, w = shape
    return [
        Reshape(shape),
        conv(c, 16), nn.ReLU(), nn.MaxPool2d(2),
        conv(16, 32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), linear(32 * (h // 4) * (w // 4), classes),
    ]


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the model architecture anywhere (it pickles to pools)."""

    config: ModelConfig
    input_shape: tuple[int, ...]
    num_classes: int
    weight_seed: int = 0  # a supermask model's fixed random weights (the same everywhere)

    def build(self) -> nn.Module:
        features = int(torch.Size(self.input_shape).numel())
        kind = self.config.kind
        linear, conv = self._layers()
        if kind == "cnn":
            layers = _cnn(self.input_shape, self.num_classes, linear, conv)
        else:
            hidden = [] if kind == "logistic" else list(self.config.hidden)
            layers = [nn.Flatten(), *_mlp(features, hidden, self.num_classes, linear)]
        return nn.Sequential(*layers)

    def _layers(self) -> tuple[Layer, Layer]:
        mask = self.config.supermask
        if mask is None:
            return nn.Linear, _conv3x3
        weights = torch.Generator().manual_seed(self.weight_seed)  # one stream, layer by layer
        options = {"keep": mask.keep, "by_magnitude": mask.by_magnitude, "generator": weights}
        return partial(SupermaskLinear, **options), partial(SupermaskConv2d, **options)

    def supermask_layers(self) -> tuple[int, ...]:
        """The number of edges of each ranked layer, in flat-vector order: a supermask model's
        parameters are exactly its layers' scores. () for a dense model."""
        if self.config.supermask is None:
            return ()
        return tuple(p.numel() for p in self.build().parameters())

"""Models over flat inputs: logistic regression, MLP, and a small CNN for image tasks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.config import ConfigError, ModelConfig


class Reshape(nn.Module):
    """Flat features [B, F] -> [B, *shape] (batch-dim agnostic, so it works under vmap)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)


def _mlp(features: int, hidden: list[int], classes: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(features, width), nn.ReLU()]
        features = width
    return [*layers, nn.Linear(features, classes)]


def _cnn(shape: tuple[int, ...], classes: int) -> list[nn.Module]:
    if len(shape) != 3:
        raise ConfigError(f"task.model.kind: cnn needs image inputs (C, H, W); got shape {shape}")
    c, h, w = shape
    return [
        Reshape(shape),
        nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * (h // 4) * (w // 4), classes),
    ]


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the model architecture anywhere (it pickles to pools)."""

    config: ModelConfig
    input_shape: tuple[int, ...]
    num_classes: int

    def build(self) -> nn.Module:
        features = int(torch.Size(self.input_shape).numel())
        kind = self.config.kind
        if kind == "cnn":
            layers = _cnn(self.input_shape, self.num_classes)
        else:
            hidden = [] if kind == "logistic" else list(self.config.hidden)
            layers = [nn.Flatten(), *_mlp(features, hidden, self.num_classes)]
        return nn.Sequential(*layers)

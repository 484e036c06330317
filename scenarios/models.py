"""Models over flat inputs: logistic regression, MLP, and a small CNN for image tasks, each
dense or as a supermask model (scenarios/supermask.py: fixed random weights, trained scores)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from engine.core.config import SupermaskConfig
from engine.core.errors import ConfigError
from engine.core.plugins import Registry
from scenarios.supermask import SupermaskConv2d, SupermaskLinear

Layer = Callable[[int, int], nn.Module]  # (inputs, outputs) -> a linear or 3x3 conv layer


class Reshape(nn.Module):
    """Flat features [B, F] -> [B, *shape] (batch-dim agnostic, so it works under vmap)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)


def _mlp_layers(features: int, hidden: list[int], classes: int,
                linear: Layer) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [linear(features, width), nn.ReLU()]
        features = width
    return [*layers, linear(features, classes)]


def _conv3x3(inputs: int, outputs: int) -> nn.Module:
    return nn.Conv2d(inputs, outputs, 3, padding=1)


# An architecture is a function (input_shape, classes, linear, conv, **parameters) -> layers;
# `linear` and `conv` are dense layers, or supermask ones (scenarios/supermask.py).


def logistic(input_shape: tuple[int, ...], classes: int, linear: Layer,
             conv: Layer) -> list[nn.Module]:
    """Multinomial logistic regression on the flat features."""
    return [nn.Flatten(), linear(int(torch.Size(input_shape).numel()), classes)]


def mlp(input_shape: tuple[int, ...], classes: int, linear: Layer, conv: Layer,
        hidden: list[Annotated[int, Field(ge=1)]] = (64,)) -> list[nn.Module]:
    """A multi-layer perceptron with ReLU between `hidden` widths."""
    features = int(torch.Size(input_shape).numel())
    return [nn.Flatten(), *_mlp_layers(features, list(hidden), classes, linear)]


def cnn(input_shape: tuple[int, ...], classes: int, linear: Layer,
        conv: Layer) -> list[nn.Module]:
    """Two 3x3 conv layers (16, 32 channels) with ReLU and 2x2 max pooling, then a linear
    layer; for image inputs (C, H, W)."""
    if len(input_shape) != 3:
        raise ConfigError(f"task.model.kind: cnn needs image inputs (C, H, W); got shape "
                          f"{input_shape}")
    c, h, w = input_shape
    return [
        Reshape(input_shape),
        conv(c, 16), nn.ReLU(), nn.MaxPool2d(2),
        conv(16, 32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), linear(32 * (h // 4) * (w // 4), classes),
    ]


MODELS: Registry[Callable[..., list[nn.Module]]] = Registry("model", {
    "logistic": logistic, "mlp": mlp, "cnn": cnn,
}, runtime=("input_shape", "classes", "linear", "conv"))


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the model anywhere (it pickles to pools): the
    architecture (a MODELS entry with its parameters bound), the data's shape and classes,
    and, for a supermask model, its settings and the seed of its fixed weights."""

    architecture: Callable[..., list[nn.Module]]
    input_shape: tuple[int, ...]
    num_classes: int
    supermask: SupermaskConfig | None = None
    weight_seed: int = 0  # a supermask model's fixed random weights (the same everywhere)

    def build(self) -> nn.Module:
        linear, conv = self._layers()
        return nn.Sequential(*self.architecture(self.input_shape, self.num_classes, linear,
                                                conv))

    def _layers(self) -> tuple[Layer, Layer]:
        mask = self.supermask
        if mask is None:
            return nn.Linear, _conv3x3
        weights = torch.Generator().manual_seed(self.weight_seed)  # one stream, layer by layer
        options = {"keep": mask.keep, "by_magnitude": mask.by_magnitude, "generator": weights}
        return partial(SupermaskLinear, **options), partial(SupermaskConv2d, **options)

    def layer_sizes(self) -> tuple[int, ...]:
        """The size of each parameter tensor (a layer's weight, its bias), in flat-vector
        order (ParamSpec's): what per-layer aggregation stages (model_stock) split by."""
        return tuple(p.numel() for p in self.build().parameters())

    def supermask_layers(self) -> tuple[int, ...]:
        """The number of edges of each ranked layer, in flat-vector order: a supermask model's
        parameters are exactly its layers' scores. () for a dense model."""
        if self.supermask is None:
            return ()
        return tuple(p.numel() for p in self.build().parameters())

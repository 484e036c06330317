"""Evaluate a flat parameter vector on a held-out test set."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from engine.core.params import ParamSpec
from scenarios.models import ModelSpec


class Evaluator:
    def __init__(self, model: ModelSpec, x_test: np.ndarray, y_test: np.ndarray,
                 chunk: int = 4096) -> None:
        self.module = model.build()
        self.spec = ParamSpec.of(self.module)
        self.x, self.y = torch.from_numpy(np.array(x_test)), torch.from_numpy(np.array(y_test))
        self.chunk = chunk

    @torch.no_grad()
    def __call__(self, params: torch.Tensor) -> tuple[float, float]:
        """(mean cross-entropy, accuracy) of the model `params` on the test set."""
        named = self.spec.unflatten(params)
        loss, correct = 0.0, 0
        for lo in range(0, len(self.y), self.chunk):
            x, y = self.x[lo : lo + self.chunk], self.y[lo : lo + self.chunk]
            logits = functional_call(self.module, named, (x,))
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == y).sum())
        return loss / len(self.y), correct / len(self.y)

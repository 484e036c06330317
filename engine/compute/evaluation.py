"""Evaluate a flat parameter vector: on a held-out test set, or, for a task whose clients
learn by acting, on held-out environments (engine/compute/rl.py ReturnEvaluator)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from engine.compute.rl import ReturnEvaluator
from engine.core.params import ParamSpec
from scenarios.environments import EnvTask
from scenarios.models import ModelSpec
from scenarios.task import FederatedTask


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


def task_evaluator(task: FederatedTask | EnvTask, seed: int,
                   rows: np.ndarray | None = None) -> Evaluator | ReturnEvaluator:
    """What scores a task's models: (test loss, accuracy) on its held-out samples (`rows` of
    them, default all), or (None, None, mean test return) on its held-out environments."""
    if isinstance(task, EnvTask):
        return ReturnEvaluator(task.model, task.envs.env, seed)
    x, y = task.data.x_test, task.data.y_test
    return Evaluator(task.model, x if rows is None else x[rows], y if rows is None else y[rows])


class ValidationAccuracy:
    """A model's accuracy on the task's validation split (`task.validation_fraction`): what
    a stage that scores models on the server's held-out data (greedy_soup) calls."""

    def __init__(self, model: ModelSpec, x_val: np.ndarray, y_val: np.ndarray) -> None:
        self.evaluator = Evaluator(model, x_val, y_val)

    def __call__(self, params: torch.Tensor) -> float:
        return self.evaluator(params)[1]


def validation_scorer(task: FederatedTask | EnvTask) -> ValidationAccuracy | None:
    """The scorer of a task's validation split; None when it has none."""
    data = getattr(task, "data", None)
    if data is None or data.x_val is None:
        return None
    return ValidationAccuracy(task.model, data.x_val, data.y_val)

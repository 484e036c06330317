"""Local training of a batch of clients: a `vmap` executor and a `loop` reference executor.

Both consume the same batch plan, an index tensor [C, T, B] of shard rows (-1 = padding):
client c takes step t on the rows plan[c, t] that are >= 0, and does nothing on a step whose
rows are all padding. So clients with unequal data sizes train in lock-step under vmap, and
both executors apply exactly the same SGD steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

from engine.core.errors import ConfigError
from engine.core.params import ParamSpec
from engine.core.plugins import Registry
from engine.core.seeds import keyed_permutations


def pin_torch_arithmetic() -> None:
    """One thread and no mkldnn kernels: then a client's result is bitwise independent of
    which other clients share its vmap batch (measured: with 2 threads, or mkldnn convolutions,
    results differ by ~1e-8), so 1 pool, N pools, Ray and inline agree exactly."""
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False


@dataclass(frozen=True)
class LocalSGD:
    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.0  # Polyak momentum, EMA form: m <- b m + (1 - b) g; w <- w - lr m
    prox_mu: float = 0.0  # FedProx: g + mu (w - w_start), the proximal term's gradient
    max_steps: int | None = None  # local-step budget: at most this many SGD steps a round
    min_steps: int | None = None  # with max_steps: a budget drawn in [min, max] per client
    scaffold: bool = False  # SCAFFOLD: pools keep control variates, gradients are corrected
    sam_rho: float = 0.0  # SAM: each gradient is taken at w + rho g / ||g|| (0: plain SGD)
    frozen: int = 0  # the first `frozen` coordinates (feature layers) never train (Bristle)


@dataclass(frozen=True)
class Trained:
    deltas: torch.Tensor  # [C, P] local params - global params
    losses: torch.Tensor  # [C] mean training loss over the client's steps
    steps: torch.Tensor  # [C] SGD steps taken
    momentum: torch.Tensor | None = None  # [C, P] final momentum buffers (momentum > 0)


def batch_plan(keys: np.ndarray, offsets: np.ndarray, counts: np.ndarray, hp: LocalSGD):
    """Shard-row indices [C, T, B] for `hp.epochs` shuffled epochs of each client.

    `keys` is one uint64 per (client, round) from the seed tree; epoch e of client c is the
    permutation keyed by keys[c] + e. Each epoch is padded to a whole number of batches.
    """
    b, e = hp.batch_size, hp.epochs
    steps = -(-counts // b)  # ceil: batches per epoch, per client
    width = int(steps.max()) * b
    perms = np.stack([keyed_permutations(keys + np.uint64(k), counts, width) for k in range(e)],
                     axis=1)  # [C, E, width]
    epoch_len = (steps * b)[:, None]  # [C, 1] padded epoch length
    pos = np.arange(e * width)[None, :]
    epoch, within = pos // epoch_len, pos % epoch_len
    valid = epoch < e
    flat = np.where(valid, epoch, 0) * width + within
    local = np.take_along_axis(perms.reshape(len(keys), -1), flat, axis=1)
    rows = np.where(valid & (local >= 0), local + offsets[:, None], -1)
    return torch.from_numpy(rows.reshape(len(keys), -1, b))


def step_budgets(hp: LocalSGD, seeds, client_ids: np.ndarray,
                 round_idx: int) -> np.ndarray | None:
    """Each client's local-step budget this round: max_steps, or a draw in
    [min_steps, max_steps] keyed by (round, client) (systems heterogeneity, as in FedProx's
    experiments); None without a budget."""
    if hp.max_steps is None:
        return None
    if hp.min_steps is None:
        return np.full(client_ids.size, hp.max_steps, dtype=np.int64)
    keys = seeds.client_keys("step_budget", round_idx, client_ids)
    span = np.uint64(hp.max_steps - hp.min_steps + 1)
    return (hp.min_steps + keys % span).astype(np.int64)


def local_steps(hp: LocalSGD, sizes: np.ndarray, seeds, client_ids: np.ndarray,
                round_idx: int) -> np.ndarray:
    """The SGD steps each client takes this round: `epochs` passes of ceil(n / batch) batches,
    cut to its budget (what the pools will run; the world models time it)."""
    steps = hp.epochs * -(-np.asarray(sizes, dtype=np.int64) // hp.batch_size)
    budgets = step_budgets(hp, seeds, client_ids, round_idx)
    return steps if budgets is None else np.minimum(steps, budgets)


def step_budget(plan: torch.Tensor, budgets: np.ndarray | None) -> torch.Tensor:
    """The plan with client c's steps from budgets[c] on turned into padding (a client's real
    batches come first in its plan, so it takes exactly min(budget, its steps) steps)."""
    if budgets is None:
        return plan
    budgets = torch.as_tensor(np.array(budgets, dtype=np.int64))  # a private, writable copy
    late = torch.arange(plan.shape[1])[None, :] >= budgets[:, None]
    return plan.masked_fill(late[:, :, None], -1)


def _batch_loss(model: nn.Module, spec: ParamSpec):
    def loss(flat, x, y, mask):
        logits = functional_call(model, spec.unflatten(flat), (x,))
        per_sample = F.cross_entropy(logits, y, reduction="none")
        return torch.where(mask > 0, per_sample, 0.0).sum() / mask.sum().clamp(min=1.0)

    return loss


def _tensor_batch_loss(model: nn.Module):
    """`_batch_loss` on the parameters as a dict of tensors (one per parameter tensor)."""
    def loss(params, x, y, mask):
        per_sample = F.cross_entropy(functional_call(model, params, (x,)), y, reduction="none")
        return torch.where(mask > 0, per_sample, 0.0).sum() / mask.sum().clamp(min=1.0)

    return loss


def _padded_as_zeros(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor):
    """A step's batches [C, B, ...] with the padding rows (mask False) set to zero inputs and
    label 0. Padding is the pool's row 0, which depends on the pool layout: near overflow its
    loss could be inf in one layout only, and inf * 0 is NaN. Zeros are the same everywhere."""
    keep = mask.view(*mask.shape, *([1] * (x.dim() - 2)))
    return torch.where(keep, x, 0.0), torch.where(mask, y, 0)


class VmapExecutor:
    """All clients step together: the per-client loss is torch.func.vmap-ed over a functional
    model call on the stacked parameters [C, P], and one reverse pass of the summed losses gives
    every client's gradient (the clients' parameters are independent, so d(sum_c L_c)/dW_c =
    dL_c/dW_c). Measured ~1.4x faster than vmap(grad(loss)) at 50 clients of W1, same values
    to 5e-8 (tests hold it to the loop executor)."""

    def __init__(self, model: nn.Module, spec: ParamSpec) -> None:
        self._losses = vmap(_tensor_batch_loss(model))
        self._spec = spec

    def _gradient(self, w: torch.Tensor, xb, yb, step_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """(losses [C], gradients [C, P]) at w [C, P]. The gradient is taken with respect to
        each parameter tensor's view of w (then concatenated), not w itself: autograd then does
        not scatter every tensor's gradient into a zero [C, P] (W1's MLP: 2.4 ms instead of 4.4
        ms a step at 50 clients, the same bits)."""
        c, spec = w.shape[0], self._spec
        leaves = [w[:, a:b].detach().reshape(c, *shape).requires_grad_(True)
                  for (a, b), shape in zip(spec.spans(), spec.shapes, strict=True)]
        losses = self._losses(dict(zip(spec.names, leaves, strict=True)), xb, yb, step_mask)
        grads = torch.autograd.grad(losses.sum(), leaves)
        return losses.detach(), torch.cat([g.reshape(c, -1) for g in grads], dim=1)

    def __call__(self, params, x, y, plan: torch.Tensor, hp: LocalSGD,
                 momentum: torch.Tensor | None = None,
                 correction: torch.Tensor | None = None) -> Trained:
        """`momentum`: starting buffers [C, P] (zeros if None) when hp.momentum > 0;
        `correction` [C, P]: added to every gradient (SCAFFOLD's c - c_i)."""
        mask = plan >= 0
        rows = plan.clamp(min=0)
        start = params.expand(plan.shape[0], -1)  # params: [P] shared or [C, P]
        weights, buf = start.clone(), _buffers(start, hp, momentum)
        loss_sum = torch.zeros(plan.shape[0])
        for t in range(plan.shape[1]):
            xb, yb = _padded_as_zeros(x[rows[:, t]], y[rows[:, t]], mask[:, t])
            step_mask = mask[:, t].float()

            def gradient(w, xb=xb, yb=yb, step_mask=step_mask):
                return self._gradient(w, xb, yb, step_mask)

            losses, grads = sharpness_aware(gradient, weights, hp.sam_rho, hp.frozen)
            if correction is not None:
                grads = grads + correction
            weights, buf = _sgd_step(weights, grads, buf, start, mask[:, t], hp)
            loss_sum += losses
        steps = mask.any(dim=2).sum(dim=1)
        return Trained(weights - params, loss_sum / steps.clamp(min=1), steps, buf)


SAM_EPS = 1e-12  # added to ||g|| (as in Foret et al.'s and the common PyTorch SAM code)


def frozen_as_zero(grads: torch.Tensor, frozen: int) -> torch.Tensor:
    """The gradient with its first `frozen` coordinates (the frozen feature layers of
    `training.freeze_features`) set to 0, so neither SGD nor SAM's perturbation moves them."""
    if frozen == 0:
        return grads
    out = grads.clone()
    out[..., :frozen] = 0.0
    return out


def sharpness_aware(gradient: Callable, weights: torch.Tensor, rho: float, frozen: int = 0):
    """Sharpness-Aware Minimization's gradient (Foret, Kleiner, Mobahi & Neyshabur, 2021,
    "Sharpness-Aware Minimization for Efficiently Improving Generalization"), the local
    optimizer of FedSAM (Qu et al., 2022) and DFedSAM (Shi, Shen, Wang & Tao, 2023, "Improving
    the Model Consistency of Decentralized Federated Learning"): with g0 = grad f(w) on the
    step's batch, the step uses g = grad f(w + rho g0 / (||g0|| + eps)) on the same batch.
    `gradient(w)` returns (losses, gradients) for weights [C, P] (one row per client) or [P];
    the norm is each client's global L2 norm over all its parameters (not per layer), as in
    the SAM code DFedSAM builds on. Returns the losses at w (what a step reports) and g; with
    rho = 0, plain SGD's gradient (one pass). A client with no data at a step has g0 = 0 and
    is not perturbed. What the step does with g (SCAFFOLD's correction, FedProx, momentum) is
    the caller's, as SAM's base optimizer applies it to the perturbed gradient. The first
    `frozen` coordinates of every gradient are 0 (`frozen_as_zero`); the perturbation then
    leaves them too."""
    losses, g0 = gradient(weights)
    g0 = frozen_as_zero(g0, frozen)
    if rho == 0:
        return losses, g0
    scale = rho / (torch.linalg.vector_norm(g0, dim=-1, keepdim=True) + SAM_EPS)
    return losses, frozen_as_zero(gradient(weights + scale * g0)[1], frozen)


def _sgd_step(weights, grads, buf, start, step_mask, hp: LocalSGD):
    """One SGD step of every client, with FedProx's proximal gradient and momentum if set.
    A client with no data at this step keeps its weights and momentum."""
    if buf is None and hp.prox_mu == 0 and not hp.scaffold:
        return weights - hp.lr * grads, None  # its gradient is zero where it has no data
    if hp.prox_mu:
        grads = grads + hp.prox_mu * (weights - start)
    active = step_mask.any(dim=1)[:, None]
    if buf is not None:
        buf = torch.where(active, hp.momentum * buf + (1 - hp.momentum) * grads, buf)
        grads = buf
    return torch.where(active, weights - hp.lr * grads, weights), buf


def _buffers(weights: torch.Tensor, hp: LocalSGD, momentum: torch.Tensor | None):
    if hp.momentum == 0:
        return None
    return torch.zeros_like(weights) if momentum is None else momentum.clone()


class DiagonalFisher:
    """The diagonal Fisher information of each client's local model on its own training data,
    as Fisher merging uses it (Matena & Raffel, 2022, "Merging Models with Fisher-Weighted
    Averaging"; their code takes the exact expectation over the model's predictive
    distribution, not sampled or true labels):
        F_c = (1 / n_c) sum_{x in D_c} sum_y p(y | x) (d log p(y | x) / d w_c)^2.
    Per-example Jacobians of the log-probabilities (torch.func) in blocks of `block` examples,
    so memory stays [block, classes, P]."""

    def __init__(self, model: nn.Module, spec: ParamSpec, block: int = 64) -> None:
        def log_probs(flat, x):
            return torch.log_softmax(functional_call(model, spec.unflatten(flat), (x,)), dim=-1)

        self._log_probs = log_probs
        self._jacobians = vmap(jacrev(lambda flat, x: log_probs(flat, x[None])[0]),
                               in_dims=(None, 0))
        self.block = block

    def __call__(self, weights: torch.Tensor, x: torch.Tensor, offsets: np.ndarray,
                 counts: np.ndarray) -> torch.Tensor:
        """weights [C, P]: client c's local model; its data are x[offsets[c]:+counts[c]]."""
        out = torch.zeros_like(weights)
        for c, (w, lo, n) in enumerate(zip(weights, offsets, counts, strict=True)):
            for a in range(int(lo), int(lo + n), self.block):
                xb = x[a: min(a + self.block, int(lo + n))]
                with torch.no_grad():
                    p = self._log_probs(w, xb).exp()  # [b, classes]
                jac = self._jacobians(w, xb)  # [b, classes, P]
                out[c] += torch.einsum("bk,bkp->p", p, jac.square())
            out[c] /= max(int(n), 1)
        return out


class LoopExecutor:
    """Reference: one client after another, plain autograd on an nn.Module."""

    def __init__(self, model: nn.Module, spec: ParamSpec) -> None:
        self._model = model

    def __call__(self, params, x, y, plan: torch.Tensor, hp: LocalSGD,
                 momentum: torch.Tensor | None = None,
                 correction: torch.Tensor | None = None) -> Trained:
        starts = params.expand(plan.shape[0], -1)  # params: [P] shared or [C, P]
        bufs = _buffers(starts, hp, momentum)
        deltas, losses, steps, finals = [], [], [], []
        for c, (start, client_plan) in enumerate(zip(starts, plan, strict=True)):
            buf = None if bufs is None else bufs[c]
            fix = None if correction is None else correction[c]
            delta, loss, n, buf = self._train_one(start, x, y, client_plan, hp, buf, fix)
            deltas.append(delta)
            losses.append(loss)
            steps.append(n)
            finals.append(buf)
        return Trained(torch.stack(deltas), torch.tensor(losses), torch.tensor(steps),
                       None if bufs is None else torch.stack(finals))

    def _gradient(self, flat: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor):
        """The batch loss at the flat weights and its gradient, by plain autograd."""
        model = self._model
        nn.utils.vector_to_parameters(flat.clone(), model.parameters())
        model.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        return loss.detach(), nn.utils.parameters_to_vector(p.grad for p in model.parameters())

    def _train_one(self, params, x, y, client_plan, hp: LocalSGD, buf, correction):
        flat = params.clone()
        loss_sum, n = 0.0, 0
        for batch in client_plan:
            rows = batch[batch >= 0]
            if rows.numel() == 0:
                continue
            loss, grad = sharpness_aware(
                lambda w, rows=rows: self._gradient(w, x[rows], y[rows]), flat, hp.sam_rho,
                hp.frozen)
            with torch.no_grad():
                if correction is not None:
                    grad = grad + correction
                if hp.prox_mu:
                    grad = grad + hp.prox_mu * (flat - params)
                if buf is not None:
                    buf = hp.momentum * buf + (1 - hp.momentum) * grad
                    grad = buf
                flat = flat - hp.lr * grad
            loss_sum, n = loss_sum + loss.item(), n + 1
        return flat - params, loss_sum / max(n, 1), n, buf


FUSED_BLOCK = 64  # clients the fused executor steps together (see _plain_sgd)


class FusedMLPExecutor(VmapExecutor):
    """The vmap executor's steps for stacks of dense layers with ReLU between them (`mlp`,
    `logistic`), forward and backward written out with batched matrix products over the
    clients (`torch.baddbmm`, `torch.bmm`) instead of vmap and autograd. The same
    mathematics (cross-entropy averaged over a step's valid samples; SAM, momentum, FedProx,
    SCAFFOLD and frozen layers through the shared step), equal to the vmap executor to about
    1e-6, not bit for bit; each client's numbers still do not depend on the others in its
    batch, so neither do the results on the pool layout (tested). Other models are refused
    when the run is prepared."""

    def __init__(self, model: nn.Module, spec: ParamSpec) -> None:
        super().__init__(model, spec)
        self._layers = fused_layers(model, spec)

    def __call__(self, params, x, y, plan: torch.Tensor, hp: LocalSGD,
                 momentum: torch.Tensor | None = None,
                 correction: torch.Tensor | None = None) -> Trained:
        """Plain SGD (no momentum, FedProx, SCAFFOLD, SAM or frozen layers) steps each layer's
        weights in place (`_plain_sgd`); anything else goes through the shared steps."""
        if (momentum is None and correction is None and not hp.scaffold and hp.momentum == 0
                and hp.prox_mu == 0 and hp.sam_rho == 0 and hp.frozen == 0):
            return self._plain_sgd(params, x, y, plan, hp.lr)
        return super().__call__(params, x, y, plan, hp, momentum, correction)

    def _plain_sgd(self, params, x, y, plan: torch.Tensor, lr: float) -> Trained:
        """Block by block of FUSED_BLOCK clients, every step of the block (its weights stay in
        cache across the steps: W2's 500 peers a pool, where all steps of all clients at
        once read [500, P] weights from memory at every step: 63 -> 35 ms a call, blocks of
        16, 32, 64, 128: 53, 41, 36, 36 ms); a client's numbers do not depend on the others
        in its block (tested), so neither do the bits."""
        c = plan.shape[0]
        deltas, losses = torch.empty(c, params.shape[-1]), torch.empty(c)
        for a in range(0, c, FUSED_BLOCK):
            block = slice(a, a + FUSED_BLOCK)
            losses[block] = self._plain_block(params if params.dim() == 1 else params[block],
                                              x, y, plan[block], lr, deltas[block])
        steps = (plan >= 0).any(dim=2).sum(dim=1)
        return Trained(deltas, losses / steps.clamp(min=1), steps, None)

    def _plain_block(self, params, x, y, plan: torch.Tensor, lr: float,
                     deltas: torch.Tensor) -> torch.Tensor:
        """A block's steps on its per-layer weights, held contiguous: the update is added
        into them by the backward pass's own products (`baddbmm_(..., alpha=-lr)`), not
        built as a [C, P] gradient and subtracted; the block's rows of all steps gathered at
        once (padding as zeros, see `_padded_as_zeros`), steps that none of it takes left
        out. Writes the deltas into `deltas`; returns the clients' summed step losses."""
        mask = plan >= 0
        num_steps = int(mask.any(dim=2).any(dim=0).nonzero().max()) + 1 if mask.any() else 0
        c, _, b = plan.shape
        mask = mask[:, :num_steps]
        rows = plan[:, :num_steps].clamp(min=0).reshape(-1)
        xs = x.index_select(0, rows).reshape(c, num_steps, b, -1)
        ys = y.index_select(0, rows).reshape(c, num_steps, b)
        if not bool(mask.all()):
            xs, ys = xs.masked_fill(~mask[..., None], 0.0), ys.masked_fill(~mask, 0)
        start = params.expand(c, -1)  # params: [P] shared or [C, P]
        layers = [(start[:, w].reshape(c, out, inp).clone(memory_format=torch.contiguous_format),
                   start[:, bias].clone(memory_format=torch.contiguous_format))
                  for w, bias, out, inp in self._layers]
        loss_sum = torch.zeros(c)
        for t in range(num_steps):
            inputs, losses, top = self._forward(layers, xs[:, t], ys[:, t], mask[:, t].float())
            for i, d in self._backward(layers, inputs, top):
                layers[i][0].baddbmm_(d.transpose(1, 2), inputs[i], alpha=-lr)
                layers[i][1].add_(d.sum(dim=1), alpha=-lr)
            loss_sum += losses
        for (w, bias, _, _), (weight, b_) in zip(self._layers, layers, strict=True):
            deltas[:, w], deltas[:, bias] = weight.reshape(c, -1), b_
        deltas.sub_(params)
        return loss_sum

    def _gradient(self, w: torch.Tensor, xb, yb, step_mask) -> tuple[torch.Tensor, torch.Tensor]:
        c, b = step_mask.shape
        layers = [(w[:, weight].view(c, out, inp), w[:, bias])
                  for weight, bias, out, inp in self._layers]
        inputs, losses, top = self._forward(layers, xb.reshape(c, b, -1), yb, step_mask)
        grads = torch.empty_like(w)
        for i, d in self._backward(layers, inputs, top):
            weight, bias, out, inp = self._layers[i]
            grads[:, weight].view(c, out, inp).copy_(torch.bmm(d.transpose(1, 2), inputs[i]))
            grads[:, bias] = d.sum(dim=1)
        return losses, grads

    @staticmethod
    def _forward(layers, h: torch.Tensor, yb, step_mask):
        """Each layer's input, the clients' mean losses over their valid samples [C], and
        dL/dlogits [C, B, classes] = (softmax - onehot) * mask / valid samples. `layers`:
        (weight [C, out, in], bias [C, out]) of each dense layer."""
        inputs = []
        for i, (weight, bias) in enumerate(layers):
            inputs.append(h)
            z = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
            h = z if i == len(layers) - 1 else torch.relu(z)
        logp = h - torch.logsumexp(h, dim=-1, keepdim=True)  # log_softmax: ~4x slower here
        valid = step_mask.sum(dim=1).clamp(min=1.0)
        nll = -logp.gather(-1, yb[..., None]).squeeze(-1)
        losses = torch.where(step_mask > 0, nll, 0.0).sum(dim=1) / valid
        d = logp.exp()
        d.scatter_add_(-1, yb[..., None], torch.full_like(nll[..., None], -1.0))
        d *= (step_mask / valid[:, None])[..., None]
        return inputs, losses, d

    @staticmethod
    def _backward(layers, inputs: list[torch.Tensor], d: torch.Tensor):
        """(layer i, dL/d its outputs [C, B, out]) from the last layer down; the next
        layer's is taken before yielding, so the caller may then change layer i's weights."""
        for i in range(len(layers) - 1, -1, -1):
            below = (torch.ops.aten.threshold_backward(torch.bmm(d, layers[i][0]), inputs[i], 0.0)
                     if i else None)  # ReLU's backward: 0 where its output was 0
            yield i, d
            d = below


def fused_layers(model: nn.Module, spec: ParamSpec) -> list[tuple[slice, slice, int, int]]:
    """(weight's slice, bias's slice, out, in) of each dense layer of a Flatten, Linear,
    (ReLU, Linear)* stack, in order; a ConfigError for any other model."""
    spans = dict(zip(spec.names, spec.spans(), strict=True))
    modules = [m for m in model if not isinstance(m, nn.Flatten)]
    kinds = [type(m) for m in modules]
    if not modules or kinds != [nn.Linear if i % 2 == 0 else nn.ReLU
                                for i in range(len(modules))] or kinds[-1] is not nn.Linear:
        raise ConfigError("training.executor: fused takes dense layers with ReLU between them "
                          "(task.model.kind mlp or logistic, without supermask); this model has "
                          + ", ".join(k.__name__ for k in kinds) + "; use vmap")
    layers = []
    for index, module in enumerate(model):
        if isinstance(module, nn.Linear):
            (wa, wb), (ba, bb) = spans[f"{index}.weight"], spans[f"{index}.bias"]
            layers.append((slice(wa, wb), slice(ba, bb), module.out_features,
                           module.in_features))
    return layers


def auto(model: nn.Module, spec: ParamSpec) -> VmapExecutor:
    """The fused executor where it can train the model (dense layers with ReLU between
    them), else the vmap executor. Not the default yet: the fused steps differ from vmap's in
    the last bits, and the shipped configs' figures were measured with vmap."""
    try:
        return FusedMLPExecutor(model, spec)
    except ConfigError:
        return VmapExecutor(model, spec)


EXECUTORS: Registry[Callable[..., Trained]] = Registry("executor", {
    "vmap": VmapExecutor, "loop": LoopExecutor, "fused": FusedMLPExecutor, "auto": auto,
}, runtime=("model", "spec"))

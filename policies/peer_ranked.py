"""Consensus policies that judge received models on a peer's own data (Neighbourhood.evidence):
Fortytwo's peer-ranked, reputation-weighted consensus. See policies/consensus.py for the
contract."""

from __future__ import annotations

from typing import Annotated

import numpy as np
import torch
from pydantic import Field

from engine.core.neighbourhood import Neighbourhood
from policies.consensus import Consensus, consensus_policy
from policies.ranks import bradley_terry_mm


def slot_logits(nb: Neighbourhood) -> torch.Tensor:
    """[n, D, B, C] log-probabilities: each slot's model (forgeries included) on each peer's own
    batch."""
    ev = nb.evidence
    return torch.stack([torch.log_softmax(ev.predict(nb.received(k), ev.x), dim=-1)
                        for k in range(nb.index.shape[1])], dim=1)


def judge_scores(logp: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                 own_slot: torch.Tensor) -> torch.Tensor:
    """[n, D (judge), D (candidate)] float64: judge j's score of candidate k on a peer's batch,
    the mean log-probability k gives to the labels j believes in. The peer itself (its own
    slot) knows its labels; any other judge takes its own model's predictions (argmax) as the
    labels: a judge prefers the models that agree with it, as a node judging answers without
    the ground truth does."""
    n, d = logp.shape[:2]
    believed = logp.argmax(dim=-1)  # [n, D, B]
    truth = labels[:, None, :].expand(n, d, -1)
    is_own = torch.arange(d)[None, :] == own_slot[:, None]  # [n, D]
    believed = torch.where(is_own[:, :, None], truth, believed)
    # picked[i, j, k, b] = logp[i, k, b, believed[i, j, b]]
    picked = torch.gather(logp[:, None].expand(n, d, d, *logp.shape[2:]), 4,
                          believed[:, :, None, :, None].expand(n, d, d, -1, 1))[..., 0]
    m = mask[:, None, None, :].double()
    return (picked.double() * m).sum(dim=-1) / m.sum(dim=-1).clamp_min(1.0)


def pairwise_judgements(scores: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """[J, K, K] float64: judgements[j, k, l] = 1 if judge j prefers candidate k to l (higher
    score), 1/2 each on a tie, 0 otherwise. Judges and candidates are the same models (valid
    slots only); a judge abstains on every pair that holds its own model."""
    d = scores.shape[0]
    better = (scores[:, :, None] > scores[:, None, :]).astype(np.float64)
    better += 0.5 * (scores[:, :, None] == scores[:, None, :])
    eye = np.eye(d, dtype=bool)
    abstain = eye[:, :, None] | eye[:, None, :] | eye[None, :, :]  # own pairs, k == l
    keep = valid[:, None, None] & valid[None, :, None] & valid[None, None, :] & ~abstain
    return np.where(keep, better, 0.0)


def peer_ranked_strengths(judgements: np.ndarray, reputation: np.ndarray,
                          valid: np.ndarray, pseudo_count: float) -> np.ndarray:
    """Bradley-Terry strengths [K] (0 on invalid slots, summing to 1 over valid ones) from the
    judges' pairwise judgements, each judge's counted with its reputation as weight."""
    wins = np.einsum("j,jkl->kl", reputation, judgements)
    idx = np.flatnonzero(valid)
    out = np.zeros(valid.size)
    out[idx] = bradley_terry_mm(wins[np.ix_(idx, idx)], pseudo_count)
    return out


def agreement(judgements: np.ndarray, strengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(agreement [J], judged [J]): the share of the pairs judge j judged whose order matches
    the consensus (strengths; a tie in either counts 1/2), and how many it judged."""
    order = np.sign(strengths[:, None] - strengths[None, :])  # +1: k above l
    judged = judgements + judgements.transpose(0, 2, 1)  # 1 where j judged the pair
    upper = np.triu(np.ones(order.shape, dtype=bool), 1)
    said = np.sign(judgements - judgements.transpose(0, 2, 1))  # judge's order of (k, l)
    match = np.where(said == order[None], 1.0, np.where((said == 0) | (order[None] == 0),
                                                       0.5, 0.0))
    count = (judged * upper).sum(axis=(1, 2))
    agreed = (match * judged * upper).sum(axis=(1, 2))
    return np.where(count > 0, agreed / np.maximum(count, 1), 0.0), count


@consensus_policy(mean_preserving=False)
def peer_ranked(batch: Annotated[int, Field(ge=1)] = 32,
                pseudo_count: Annotated[float, Field(gt=0)] = 0.1,
                learning_rate: Annotated[float, Field(gt=0, le=1)] = 0.2,
                initial_reputation: Annotated[float, Field(gt=0, le=1)] = 1.0) -> Consensus:
    """Peer-ranked, reputation-weighted consensus after Fortytwo (Larin, Naumenko, Ivashov,
    Nikitin & Firsov, 2025, "Fortytwo: Swarm Inference with Peer-Ranked Consensus",
    arXiv:2510.24801). In Fortytwo every node answers a query and judges pairs of the other
    nodes' answers; the pairwise judgements, weighted by each judge's reputation, are
    aggregated with a Bradley-Terry model into a ranking of the answers, and a node's
    reputation adapts over time to how well it did.

    Here a gossip step of peer i is the query, and the models in its neighbourhood (its own and
    its in-neighbours', as received: forgeries too) are both the answers and the judges:
    - a judgement: on a batch of `batch` of peer i's own training samples (redrawn every step),
      judge j scores candidate k by the mean log-probability k gives to the labels j believes
      in (j's argmax predictions; peer i's own model uses the true labels), and prefers the
      higher-scoring of each pair; a judge abstains on pairs holding its own model;
    - the judgements, each weighted by the reputation peer i holds of the judge, are summed
      into win counts and fitted by Bradley-Terry (policies/ranks.py `bradley_terry_mm`,
      Hunter's MM, `pseudo_count` wins added to every pair);
    - the mixing weights are peer i's row of W reweighted by the strengths,
      a_ik = W_ik s_k / sum_l W_il s_l, so the new model is sum_k a_ik x_k;
    - reputations (state: one row per peer of reputations it holds of every peer, starting
      at `initial_reputation`) move towards each judge's agreement with the consensus, the
      share of the pairs it judged that it ordered as the Bradley-Terry strengths do:
      rep_j <- (1 - learning_rate) rep_j + learning_rate * agreement_j (judges that judged).

    Departures from the paper: Fortytwo ranks free-form inference answers and selects the top
    one; here the answers are models, they are averaged with strength-weighted gossip weights
    rather than selected, and the "judging" is done by the models themselves on the querying
    peer's data. Reputation is local (each peer's view of its neighbours), not on-chain, and
    there is no proof-of-capability stake or Sybil defence. Asynchronous: pull wake-ups; a
    woken peer ranks its live neighbourhood this way."""

    def initial(num_peers: int) -> torch.Tensor:
        return torch.full((num_peers,), initial_reputation, dtype=torch.float64)

    def update(nb: Neighbourhood):
        logp = slot_logits(nb)
        own_slot = ((nb.index == nb.own[:, None]) & nb.valid).double().argmax(dim=1)
        scores = judge_scores(logp, nb.evidence.y, nb.evidence.mask, own_slot).numpy()
        reputation = nb.state.clone()
        ids = nb.ids[nb.index].numpy()  # [n, D] global ids of the slots' senders
        weights = torch.zeros_like(nb.weights)
        valid_all, w = nb.valid.numpy(), nb.weights.double().numpy()
        for i in range(nb.num_peers):
            valid = valid_all[i]
            judgements = pairwise_judgements(scores[i], valid)
            rep = reputation[i, ids[i]].numpy() * valid
            strengths = peer_ranked_strengths(judgements, rep, valid, pseudo_count)
            mixed = w[i] * strengths
            weights[i] = torch.from_numpy(mixed / mixed.sum()).float()
            agreed, judged = agreement(judgements, strengths)
            who = ids[i][judged > 0]
            reputation[i, who] = torch.from_numpy(
                (1 - learning_rate) * rep[judged > 0] + learning_rate * agreed[judged > 0])
        return nb.weighted_sum(nb.received, weights), nb.mass[nb.own], reputation

    return Consensus(update, evidence=batch, init_state=initial)


def class_recall(logp: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(recall [n, D, C] float64, present [n, C] bool): each slot's share of peer i's batch
    samples of class c that it predicts as c, and which classes the batch holds."""
    classes = logp.shape[-1]
    onehot = torch.nn.functional.one_hot(labels, classes).double() * mask[..., None]  # [n,B,C]
    hits = (logp.argmax(dim=-1)[..., None] == torch.arange(classes)).double()  # [n,D,B,C]
    correct = (hits * onehot[:, None]).sum(dim=2)
    count = onehot.sum(dim=1)  # [n, C]
    return correct / count.clamp_min(1.0)[:, None], count > 0


def nearest_slots(dist2: torch.Tensor, keep: int) -> torch.Tensor:
    """[n, D] bool: each row's own slot and its `keep` nearest other valid slots (inf:
    padding; ties to the lower slot)."""
    order = torch.argsort(dist2, dim=1, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1])
                                            .expand_as(order).contiguous())
    return (rank <= keep) & torch.isfinite(dist2)


@consensus_policy(mean_preserving=False)
def bristle(keep: Annotated[int, Field(ge=1)] = 3,
            batch: Annotated[int, Field(ge=1)] = 64) -> Consensus:
    """Bristle's output-layer consensus (Verbraeken, de Vos & Pouwelse, 2022, "Bristle:
    Decentralized Federated Learning in Byzantine, Non-i.i.d. Environments",
    arXiv:2110.11006). Bristle freezes the transferred (non-output) layers, so only the output
    layer trains and travels; a peer integrates the output layers it receives in two stages:
    - distance-based prioritizer: rank the received output layers by their distance to its
      own and keep the `keep` closest;
    - performance-based integrator: integrate each class separately, weighting the class's
      row (weights and bias) of each kept output layer (its own included) by how well that
      model recognises the class on the peer's own data: its recall of class c on a batch of
      `batch` of the peer's samples. A class the batch lacks (non-i.i.d. peers) is averaged
      uniformly over the kept models, as is a class no kept model recognises.
    The peer keeps its own non-output layers (they are frozen and identical, so exchanging
    the output layer only is the same as exchanging the model whose features are shared).

    The frozen layers: with a model deeper than one layer the run must set
    `training.freeze_features` (refused otherwise), so local SGD trains only the output layer
    and every peer keeps the shared initial model's feature layers; with
    `task.model.kind=logistic` the extractor is the identity on the raw pixels.

    Departures: the "transferred" extractor is the shared random initialisation of the
    feature layers, not a model pre-trained on other data (none ships here), and the bytes
    counted per message are the whole model's, not the output layer's.
    The paper's explore-exploit choice of which peers to contact and its thresholds on the
    per-class performance (dropping classes that score below the peer's own) are not
    implemented: every kept model enters with weight proportional to its recall. The
    integrator's batch is drawn from the peer's training data, not a separate test split.
    Asynchronous: pull wake-ups; a woken peer integrates its live neighbourhood this way."""

    def update(nb: Neighbourhood):
        wa, wb = nb.layers[-2]  # output layer: weight [C, H] then bias [C]
        ba, bb = nb.layers[-1]
        classes = bb - ba
        own = nb.own_models()
        dist2 = torch.stack([torch.linalg.vector_norm(
            nb.received(k)[:, wa:bb] - own[:, wa:bb], dim=1).double() ** 2
            for k in range(nb.index.shape[1])], dim=1).masked_fill(~nb.valid, float("inf"))
        kept = nearest_slots(dist2, keep)
        recall, present = class_recall(slot_logits(nb), nb.evidence.y, nb.evidence.mask)
        score = recall * kept[..., None]  # [n, D, C]
        total = score.sum(dim=1, keepdim=True)
        uniform = kept[..., None].double() / kept.sum(dim=1)[:, None, None]
        use = present[:, None, :] & (total > 0)
        weights = torch.where(use, score / total.clamp_min(1e-30), uniform).float()  # [n,D,C]
        hidden = (wb - wa) // classes
        out = own.clone()

        def output_rows(k: int) -> torch.Tensor:  # [n, C, H + 1]: class c's weights and bias
            m = nb.received(k)
            return torch.cat([m[:, wa:wb].view(-1, classes, hidden), m[:, ba:bb, None]], dim=2)

        mixed = weights[:, 0, :, None] * output_rows(0)
        for k in range(1, nb.index.shape[1]):
            mixed.addcmul_(weights[:, k, :, None], output_rows(k))
        out[:, wa:wb] = mixed[:, :, :hidden].reshape(-1, wb - wa)
        out[:, ba:bb] = mixed[:, :, hidden]
        return out, nb.mass[nb.own]

    return Consensus(update, evidence=batch, output_layer=True)

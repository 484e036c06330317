"""Peer-world additions of issue 18: communication schedules ("A Single Merging Suffices"),
peer-ranked reputation-weighted consensus (Fortytwo) and Bristle's output-layer consensus."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.backends.runtime import RuntimeOptions
from engine.core.errors import ConfigError
from engine.core.neighbourhood import Evidence, Neighbourhood
from engine.experiment import run_experiment
from engine.records.logs import read_table
from policies.peer_ranked import agreement, pairwise_judgements, peer_ranked_strengths
from policies.registry import CONSENSUS
from policies.schedules import gossip_schedule
from tests.conftest import small_config

PEERS = 8


def peers_config(**sections):
    base = {"mode": "decentralized", "population": {"num_clients": PEERS},
            "topology": {"kind": "ring"}, "gossip": {"eval_peers": 2}}
    gossip = {**base["gossip"], **sections.pop("gossip", {})}
    return small_config(**{**base, **sections, "gossip": gossip})


def logged_rounds(tmp_path, cfg, name: str) -> list[dict]:
    root = tmp_path / name
    run_experiment(cfg, RuntimeOptions("inline", 1), root, False)
    return read_table(root / cfg.experiment, "rounds").sort_by("round").select(
        ["consensus_distance", "test_accuracy", "gossip_messages"]).to_pylist()


# ---------------------------------------------------------------- communication schedules


def test_schedules_known_values():
    assert gossip_schedule("constant", 3, steps=2).tolist() == [2, 2, 2]
    # uniform: floor((r + 1) 6 / 4) = 1, 3, 4, 6
    assert gossip_schedule("uniform", 4, budget=6).tolist() == [1, 2, 1, 2]
    # increasing: cumulative 10 r (r + 1) / 20 = 1, 3, 6, 10
    assert gossip_schedule("increasing", 4, budget=10).tolist() == [1, 2, 3, 4]
    # late: the last half of the rounds share the budget
    assert gossip_schedule("late", 4, budget=4).tolist() == [0, 0, 2, 2]
    assert gossip_schedule("late", 10, budget=3, late_fraction=0.3).tolist() == \
        [0] * 7 + [1, 1, 1]
    for kind in ("uniform", "increasing", "late"):
        assert gossip_schedule(kind, 7, budget=11).sum() == 11


def test_schedule_settings_a_run_does_not_use_are_refused():
    with pytest.raises(ConfigError, match="gossip.schedule.budget: a constant"):
        gossip_schedule("constant", 3, budget=4)
    with pytest.raises(ConfigError, match="needs the total"):
        gossip_schedule("late", 3)
    with pytest.raises(ConfigError, match="late_fraction: only with kind late"):
        gossip_schedule("uniform", 3, budget=3, late_fraction=0.5)
    with pytest.raises(ConfigError, match="gossip.steps: with gossip.schedule.kind=late"):
        run_experiment(peers_config(gossip={"steps": 2, "schedule": {"kind": "late",
                                                                      "budget": 3}}),
                       show_progress=False)
    with pytest.raises(ConfigError, match="gossip.schedule"):
        run_experiment(peers_config(gossip={"mode": "async", "schedule": {"kind": "uniform",
                                                                           "budget": 3}}),
                       show_progress=False)


def test_a_uniform_budget_of_one_a_round_is_the_constant_run_and_late_rounds_start_silent(
        tmp_path):
    plain = logged_rounds(tmp_path, peers_config(eval_every=1), "plain")
    uniform = logged_rounds(tmp_path, peers_config(eval_every=1, gossip={
        "schedule": {"kind": "uniform", "budget": 3}}), "uniform")
    assert uniform == plain
    late = logged_rounds(tmp_path, peers_config(eval_every=1, gossip={
        "schedule": {"kind": "late", "budget": 2, "late_fraction": 0.3}}), "late")
    assert [r["gossip_messages"] for r in late] == [0, 0, 2 * 2 * PEERS]  # ring: 2 a peer
    assert late[0]["consensus_distance"] > plain[0]["consensus_distance"]


# ---------------------------------------------------------------- Fortytwo: peer-ranked


def zermelo(wins: np.ndarray, iterations: int = 20000) -> np.ndarray:
    """Bradley-Terry by Zermelo's fixed point, a plain float64 loop (independent of ranks.py)."""
    m = len(wins)
    g = [1.0 / m] * m
    for _ in range(iterations):
        new = []
        for i in range(m):
            won = sum(wins[i][j] for j in range(m) if j != i)
            den = sum((wins[i][j] + wins[j][i]) / (g[i] + g[j]) for j in range(m) if j != i)
            new.append(won / den)
        total = sum(new)
        g = [v / total for v in new]
    return np.array(g)


def test_peer_ranked_judgements_strengths_and_reputation_known_values():
    # three models judge each other (a judge abstains on pairs holding itself);
    # scores[j, k]: judge j's score of candidate k
    scores = np.array([[0.0, -1.0, -5.0],
                       [-2.0, 0.0, -3.0],
                       [-9.0, -1.0, 0.0]])  # judge 2 (Byzantine) prefers 1 to 0
    valid = np.array([True, True, True])
    j = pairwise_judgements(scores, valid)
    assert j[0, 1, 2] == 1 and j[0, 2, 1] == 0  # judge 0 on (1, 2) only
    assert j[1, 0, 2] == 1 and j[2, 1, 0] == 1
    assert j[0].sum() == j[1].sum() == j[2].sum() == 1  # one pair each
    rep = np.array([1.0, 1.0, 0.25])
    s = peer_ranked_strengths(j, rep, valid, 0.1)
    wins = np.full((3, 3), 0.1)
    np.fill_diagonal(wins, 0.0)
    wins[1, 2] += 1.0  # judge 0
    wins[0, 2] += 1.0  # judge 1
    wins[1, 0] += 0.25  # judge 2, at its reputation
    np.testing.assert_allclose(s, zermelo(wins.tolist()), rtol=1e-8)
    assert s[2] < min(s[0], s[1])
    agreed, judged = agreement(j, s)
    # consensus order: 1 > 0 > 2 here (s[1] > s[0]); every judge's single pair agrees
    assert s[1] > s[0] and judged.tolist() == [1, 1, 1] and agreed.tolist() == [1, 1, 1]


def linear_evidence(x: np.ndarray, y: np.ndarray) -> Evidence:
    """A linear model [F, C] flattened: logits = x @ W."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def predict(models, xb):
        return torch.einsum("nbf,nfc->nbc", xb, models.view(models.shape[0], xb.shape[-1], -1))

    return Evidence(xt, yt, torch.ones(yt.shape, dtype=torch.bool), predict)


def test_peer_ranked_downweights_a_model_that_disagrees_and_lowers_its_reputation():
    """Four peers on a complete graph, a 2-class linear model on 1 feature: three peers hold
    good models (sign agrees with the labels), peer 3 the opposite. Every peer ranks peer 3
    last; its weight and the reputation every peer holds of it drop."""
    rng = np.random.default_rng(0)
    n, b = 4, 16
    x = rng.normal(size=(n, b, 1)).astype(np.float32)
    y = (x[..., 0] > 0).astype(np.int64)
    models = np.array([[-1.0, 1.0], [-2.0, 2.0], [-0.5, 0.7], [3.0, -3.0]], dtype=np.float32)
    w = np.full((n, n), 0.25, dtype=np.float32)
    index = torch.arange(n).expand(n, n).clone()
    nb = Neighbourhood(torch.from_numpy(models), torch.ones(n), index, torch.from_numpy(w),
                       torch.ones(n, n, dtype=torch.bool), torch.arange(n),
                       ids=torch.arange(n), evidence=linear_evidence(x, y),
                       state=torch.ones(n, n, dtype=torch.float64))
    out, mass, rep = CONSENSUS["peer_ranked"](batch=b, learning_rate=0.5).update(nb)
    plain = models.mean(axis=0)
    for i in range(3):
        # peer 3's weight is far below 1/4: the honest mean is approached
        assert abs(out[i, 0].item() - models[:3, 0].mean()) < abs(plain[0] - models[:3, 0].mean())
    # peer 3 itself judges with the true labels, so it agrees with the consensus in its row
    assert (rep[:3, 3] < rep[:3, :3].min(dim=1).values).all() and rep[3, 3] == 1.0
    assert torch.equal(mass, torch.ones(n))


# ---------------------------------------------------------------- Bristle


def test_bristle_prioritizer_and_per_class_integrator_known_values():
    """A logistic output layer, 2 classes on 1 feature: model = [w_0, w_1, b_0, b_1], logits
    x w + b. Peer 0 (own: recall 1 on both classes) hears peer 1 (always predicts class 0:
    recall 1, 0) and peer 2 (far away). keep=1 drops peer 2; class 0 is averaged 1/2, 1/2
    (both recall 1), class 1 only from peer 0 (peer 1's recall is 0)."""
    models = np.array([[-1.0, 1.0, 0.0, 0.0],
                       [0.0, 0.0, 1.0, -1.0],
                       [50.0, -50.0, 9.0, 9.0]], dtype=np.float32)
    x = np.array([[[-1.0], [-2.0], [1.0], [2.0]]] * 3, dtype=np.float32)
    y = np.array([[0, 0, 1, 1]] * 3)

    def predict(m, xb):
        return xb * m[:, None, :2] + m[:, None, 2:]

    ev = Evidence(torch.from_numpy(x), torch.from_numpy(y), torch.ones(3, 4, dtype=torch.bool),
                  predict)
    n = 3
    nb = Neighbourhood(torch.from_numpy(models), torch.ones(n),
                       torch.arange(n).expand(n, n).clone(), torch.full((n, n), 1 / 3),
                       torch.ones(n, n, dtype=torch.bool), torch.arange(n),
                       layers=((0, 2), (2, 4)), ids=torch.arange(n), evidence=ev)
    out, _ = CONSENSUS["bristle"](keep=1, batch=4).update(nb)
    # class 0 row: (w_0, b_0) = mean of peers 0 and 1; class 1 row: peer 0's
    np.testing.assert_allclose(out[0].numpy(), [-0.5, 1.0, 0.5, 0.0], atol=1e-6)


@pytest.mark.parametrize("model,consensus", [
    (None, {"peer_ranked": {"batch": 16}}), ("logistic", {"bristle": {"keep": 2}})])
def test_judging_policies_beat_gossip_with_dissensus_peers(tmp_path, model, consensus):
    """Dissensus peers (He et al.'s attack, 1 of 8) on a random 4-regular graph, 3 rounds:
    plain gossip's averaged model breaks; peer-ranked consensus (the small task's model) and
    Bristle (its output layer only: a logistic model) keep it useful."""
    attacked = dict(attack={"kind": "dissensus", "fraction": 0.125}, rounds=3,
                    topology={"kind": "random_regular", "degree": 4},
                    **({} if model is None else {"task": {"model": {"kind": model}}}))
    gossip = logged_rounds(tmp_path, peers_config(**attacked), "g")[-1]["test_accuracy"]
    judged = logged_rounds(tmp_path, peers_config(consensus=consensus, **attacked),
                           "j")[-1]["test_accuracy"]
    assert judged > gossip + 0.1, (gossip, judged)

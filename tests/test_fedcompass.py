"""FedCompass (Li et al., ICLR 2024, arXiv 2309.14675) in virtual time: the COMPASS scheduler's
rules by hand, a whole schedule by hand, speed-aware groups, and runs on the shipped world."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.backends.runtime import InlinePools
from engine.core.errors import ConfigError
from engine.core.plans import Dispatch
from engine.experiment import run_experiment
from engine.resolve import load
from policies.asynchronous import Compass, Group, fedcompass
from policies.registry import build_aggregator, stage_specs
from policies.staleness import STALENESS
from tests.conftest import ROOT, small_config
from tests.test_world_loop import INLINE, _versions, devices_file

FAST_LINKS = 1e300  # bytes/s: transfers take < 1e-290 s, so task times are steps * step_s


def compass_config(tmp_path, step_s, rounds, q_max, **sections):
    """Every client in the run (concurrency = N), one batch per epoch and q_max epochs;
    `sections` update these."""
    n = len(step_s)
    raw = {
        "devices": {"path": devices_file(tmp_path, step_s, FAST_LINKS, FAST_LINKS)},
        "population": {"num_clients": n},
        "training": {"local_epochs": q_max, "batch_size": 4096},
        "server": {"mode": "fedcompass", "concurrency": n, "max_local_steps": q_max,
                   "q_ratio": 0.2},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return small_config(rounds=rounds, eval_every=0, **raw)


def _by_version(clients) -> list[dict[int, tuple[int, int]]]:
    """Per version: client -> (local steps, staleness)."""
    out: list[dict[int, tuple[int, int]]] = []
    for row in clients.to_pylist():
        while len(out) <= row["round"]:
            out.append({})
        out[row["round"]][row["client_id"]] = (row["local_steps"], row["staleness"])
    return out


def test_the_scheduler_joins_opens_and_buffers_late_updates():
    """Q_max 10, Q_min 2, lambda 1.5; speeds (s/step) 0.125, 0.25, 0.5 known, 1.0 for client 4.
    t=0: 0 finds no group and opens G0 with Q_max (expects it at 1.25, waits until 1.875);
    1 and 2 join G0 with floor(1.25 / speed) = 5 and 2 steps. 0 and 1 are back at 1.25; 2 is
    slower than estimated, so G0 is aggregated at its latest time 1.875 with 0 and 1, who go
    back fastest first: 0 opens G1 (Q_max: no open group; 3.125 / 3.75), 1 joins it with 5.
    2 is back late at 2.0: general buffer, and it joins G1 at once with floor(1.125/0.5) = 2.
    Client 4 cannot join G1 (1 step < Q_min): it opens G2 with the steps that bring it back
    when G1's fastest member could be back again, floor((3.75 + 10 * 0.125 - 2) / 1) = 3.
    G1's last member is back at 3.125: the general buffer and G1's updates are aggregated."""
    c = Compass(q_max=10, q_min=2, tolerance=1.5, speed={0: 0.125, 1: 0.25, 2: 0.5, 4: 1.0})
    assert Compass.of(10, 0.25, 1.5).q_min == 2  # floor(2.5)
    assert c.assign(0, 0.0) == (10, 0)
    assert (c.groups[0].expected_s, c.groups[0].latest_s) == (1.25, 1.875)
    assert c.assign(1, 0.0) == (5, None) and c.assign(2, 0.0) == (2, None)
    d0, d1, d2 = (Dispatch(k, k, 0, 0.0, q * s, q, "completed")
                  for k, q, s in [(0, 10, 0.125), (1, 5, 0.25), (2, 2, 0.5)])
    assert c.arrive(d0, 1.25) == ([], []) and c.arrive(d1, 1.25) == ([], [])
    assert c.close(0) == ([d0, d1], [0, 1])  # G0's latest arrival time
    assert c.groups[0].closed and c.groups[0].waiting == [2]
    assert c.close(0) == ([], [])  # aggregated once
    assert c.assign(0, 1.875) == (10, 1)
    assert (c.groups[1].expected_s, c.groups[1].latest_s) == (3.125, 3.75)
    assert c.assign(1, 1.875) == (5, None)
    assert c.arrive(d2, 2.0) == ([], [2]) and c.general == [d2] and 0 not in c.groups
    assert c.assign(2, 2.0) == (2, None)
    assert c.assign(3, 2.0) == (10, None) and 3 not in c.group_of  # no estimate yet
    assert c.assign(4, 2.0) == (3, 2)
    assert (c.groups[2].expected_s, c.groups[2].latest_s) == (5.0, 6.5)
    e2, e0, e1 = (Dispatch(k + 5, k, 2, t0, q * s, q, "completed")
                  for k, t0, q, s in [(2, 2.0, 2, 0.5), (0, 1.875, 10, 0.125),
                                      (1, 1.875, 5, 0.25)])
    assert c.arrive(e2, 3.0) == ([], []) and c.arrive(e0, 3.125) == ([], [])
    assert c.arrive(e1, 3.125) == ([d2, e2, e0, e1], [0, 1, 2]) and c.general == []
    assert c.lost(4) == ([], []) and list(c.groups) == []  # G2 waits for nobody now
    # speeds: time per step, the newest sample weighted 0.9
    c.observe(Dispatch(9, 5, 0, 1.0, 2.0, 10, "completed"), 3.0)
    c.observe(Dispatch(10, 5, 0, 3.0, 2.0, 4, "completed"), 5.0)
    assert c.speed[5] == pytest.approx(0.1 * 0.2 + 0.9 * 0.5)


def test_the_scheduler_edge_rules():
    """Ties go to the later group; arriving exactly at the latest time is on time; a lost
    update completes its group; a group's steps are at least Q_min and ignore groups whose
    latest arrival time has passed (or that would need more than Q_max steps)."""
    c = Compass(q_max=10, q_min=2, tolerance=1.5, speed={7: 0.1, 8: 0.1, 5: 1.0},
                groups={0: Group(3.0, 4.5, [7]), 1: Group(3.2, 4.8, [8])}, opened=2)
    c.group_of.update({7: 0, 8: 1})
    assert c.assign(5, 0.0) == (3, None) and c.groups[1].waiting == [8, 5]  # 3 steps both
    d5, d7 = Dispatch(0, 5, 0, 0.0, 3.0, 3, "completed"), Dispatch(1, 7, 0, 0.0, 3.0, 30,
                                                                   "completed")
    assert c.arrive(d5, 4.8) == ([], []) and c.groups[1].arrived == [d5]
    assert c.lost(8) == ([d5], [5]) and 1 not in c.groups
    assert c.arrive(d7, 4.75) == ([], [7]) and c.general == [d7] and not c.groups

    c = Compass(q_max=10, q_min=4, tolerance=1.5, speed={7: 0.1, 6: 1.0, 9: 1.0},
                groups={0: Group(1.0, 1.5, [7])}, opened=1)
    assert c.assign(6, 1.2) == (4, 1)  # floor((1.5 + 10 * 0.1 - 1.2) / 1) = 1 -> Q_min
    # at 1.6, G0's latest time is past; G1 would need floor(7.2 + 10 - 1.6) = 15 > Q_max
    assert c.assign(9, 1.6) == (10, 2)


def test_the_server_step_weighs_staleness_and_samples():
    """x <- x + alpha * sum_i s(tau_i) n_i / n delta_i: alpha 0.5, s(tau) = 1 / (1 + tau),
    n = 80; at version 3, updates of versions 1 (10 samples) and 3 (30 samples), through the
    default chain (fedavg)."""
    rule = fedcompass(alpha=0.5, staleness=STALENESS.make("polynomial", a=1.0))
    batch = (Dispatch(0, 4, 1, 0.0, 1.0, 5, "completed", torch.tensor([3.0, 0.0]), 0.0, 10),
             Dispatch(1, 6, 3, 0.0, 1.0, 5, "completed", torch.tensor([0.0, 8.0]), 0.0, 30))
    updates, scale = rule.updates(batch, 3, None, 80.0)
    assert updates.staleness.tolist() == [2, 0]
    chain = build_aggregator(stage_specs("fedavg"))
    step, _ = chain.update(updates, chain.init(torch.zeros(2)))
    expected = [1 + 0.5 / 3 * 10 / 80 * 3, 1 + 0.5 * 30 / 80 * 8]
    torch.testing.assert_close(torch.ones(2) + scale * step, torch.tensor(expected))


def test_fedcompass_follows_the_hand_worked_schedule(tmp_path, monkeypatch):
    """Clients A, B, C = 0, 1, 2 take 0.125, 0.25, 0.5 s a step, no communication time;
    Q_max 10, q_ratio 0.2 (Q_min 2), lambda 1.5. vN = the N-th version (rounds row N-1).
    t=0     A, B, C: no speed yet, Q_max = 10 steps in no group: back at 1.25, 2.5, 5.0.
    1.25    A (speed 0.125) alone -> v1 (tau 0). No group: A opens G0, 10 steps (1.25 s):
            expected 2.5, latest 2.5 + 0.5 * 1.25 = 3.125.
    2.5     B (0.25) alone -> v2 (tau 1). G0 has 0 s left: B opens G1 with
            floor((3.125 + 10 * 0.125 - 2.5) / 0.25) = 7 steps: expected 4.25, latest 5.125.
            A (in G0, on time) was G0's last -> v3 = {A} (tau 1). G1 needs 14 steps of A
            and its opening bound 41 (both > Q_max): A opens G2 with 10: expected 3.75,
            latest 4.375.
    3.75    A completes G2 -> v4 = {A} (tau 0); A joins G1 with floor(0.5 / 0.125) = 4.
    4.25    B, then A, back for G1 -> v5 = {A, B} (tau 0, 2). Fastest first: A opens G3 with
            10 (expected 5.5, latest 6.125), B joins it with floor(1.25 / 0.25) = 5.
    5.0     C (0.5) alone -> v6 (tau 5). G3 left 0.5 s = 1 step < Q_min: C opens G4 with
            floor((6.125 + 1.25 - 5) / 0.5) = 4 steps: expected 7.0, latest 8.0.
    5.5     A, B complete G3 -> v7 = {A, B} (tau 1, 1). A: G4 needs 12 steps, bound 60:
            A opens G5 with 10 (expected 6.75); B: G4 gives floor(1.5 / 0.25) = 6 > G5's 5,
            so B joins G4.
    6.75    A completes G5 -> v8 = {A} (tau 0); A joins G4 with floor(0.25 / 0.125) = 2.
    7.0     C, B, A complete G4 -> v9 = {A, B, C} (tau 0, 1, 2).
    The pools train exactly the assigned steps."""
    trained = []
    train = InlinePools.train

    def spy(self, params, selected, round_idx, pre_reduce, control=None, budgets=None,
            **rest):
        results = train(self, params, selected, round_idx, pre_reduce, control, budgets, **rest)
        steps = np.concatenate([r.updates.steps for r in results])
        trained.append((budgets.tolist(), steps.tolist()))
        return results

    monkeypatch.setattr(InlinePools, "train", spy)
    result = run_experiment(compass_config(tmp_path, [0.125, 0.25, 0.5], 9, 10), INLINE,
                            tmp_path / "logs", False)
    clients, rounds = _versions(result)
    np.testing.assert_array_equal(rounds["virtual_time"].to_numpy(),
                                  [1.25, 2.5, 2.5, 3.75, 4.25, 5.0, 5.5, 6.75, 7.0])
    assert rounds["num_updates"].to_pylist() == [1, 1, 1, 1, 2, 1, 2, 1, 3]
    assert _by_version(clients) == [
        {0: (10, 0)}, {1: (10, 1)}, {0: (10, 1)}, {0: (10, 0)}, {0: (4, 0), 1: (7, 2)},
        {2: (10, 5)}, {0: (10, 1), 1: (5, 1)}, {0: (10, 0)}, {0: (2, 0), 1: (6, 1), 2: (4, 2)}]
    steps = np.array(clients["local_steps"].to_pylist())
    np.testing.assert_array_equal(clients["task_s"].to_numpy(),
                                  steps * np.array([0.125, 0.25, 0.5])[clients["client_id"]])
    assert trained and all(budgets == done for budgets, done in trained)


def test_clients_of_different_speeds_share_groups_with_different_steps(tmp_path):
    """Eight clients 16x apart in speed (and a little latency, so speed estimates drift):
    fast and slow clients are aggregated in the same groups, the fast ones with more steps,
    and every assigned Q lies in [Q_min, Q_max] = [4, 20]."""
    step_s = [0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.45, 0.8]
    cfg = compass_config(tmp_path, step_s, 40, 20,
                         devices={"path": devices_file(tmp_path, step_s, latency_s=0.01)})
    clients, rounds = _versions(run_experiment(cfg, INLINE, tmp_path / "logs", False))
    steps = np.array(clients["local_steps"].to_pylist())
    assert steps.min() >= 4 and steps.max() <= 20 and len(set(steps.tolist())) > 5
    versions = _by_version(clients)
    groups = [v for v in versions if len(v) >= 2]
    assert sum(len(v) for v in groups) > 0.8 * clients.num_rows  # mostly semi-synchronous
    # a group spanning a 4x speed range, its steps falling as the step time grows
    spread = [v for v in groups if {0, 4} <= set(v)]
    assert any(np.all(np.diff([v[c][0] for c in sorted(v)]) < 0) for v in spread
               if len(v) >= 4)
    mean_q = [np.mean([v[c][0] for v in groups if c in v]) for c in range(5)]
    assert np.all(np.diff(mean_q) < 0), mean_q  # faster clients get more steps
    assert np.all(np.diff(rounds["virtual_time"].to_numpy()) >= 0)


def test_fedcompass_survives_lost_updates_and_churn(tmp_path):
    """Lost messages, dropouts and crash-recover churn: groups stop waiting for lost updates,
    offline clients leave their slot; the run makes every version, all from completed
    updates."""
    cfg = compass_config(tmp_path, [0.1, 0.15, 0.2, 0.3, 0.5, 0.7], 25, 10,
                         failures={"message_loss": 0.2, "dropout_after": 0.1,
                                   "crash": {"rate": 0.1, "downtime": {"kind": "constant",
                                                                       "value": 1}}},
                         population={"num_clients": 6,
                                     "availability": {"kind": "always", "slot_s": 1.0}})
    result = run_experiment(cfg, INLINE, tmp_path / "logs", False)
    clients, rounds = _versions(result)
    assert result.loop.rounds_done == 25 and rounds.num_rows == 25
    assert set(clients["status"].to_pylist()) == {"completed"}
    assert sum(rounds["num_updates"].to_pylist()) == clients.num_rows


def test_fedcompass_runs_on_the_shipped_world(tmp_path):
    cfg = load(ROOT / "configs" / "fedbuff_async.yaml",
               ["server.mode=fedcompass", "rounds=12", "eval_every=6",
                "server.max_local_steps=8", "training.local_epochs=8"])
    result = run_experiment(cfg, INLINE, tmp_path, False)
    assert result.loop.rounds_done == 12 and math.isfinite(result.loop.final_accuracy)
    clients, _ = _versions(result)
    steps = clients["local_steps"].to_pylist()
    assert min(steps) >= 1 and max(steps) <= 8  # Q_min = max(1, floor(0.2 * 8)) = 1


def test_fedcompass_refuses_step_counts_it_cannot_train(tmp_path):
    """A step budget only cuts a client's local_epochs of batches: Q_max must fit in them."""
    cfg = compass_config(tmp_path, [0.1, 0.2], 2, 10, training={"local_epochs": 3,
                                                                "batch_size": 4096})
    with pytest.raises(ConfigError, match=r"server.max_local_steps=10 exceeds the 3 steps "
                       r"training.local_epochs=3 give client \d"):
        run_experiment(cfg, INLINE, tmp_path / "logs", False)
    cfg = compass_config(tmp_path, [0.1, 0.2], 2, 10, training={"max_local_steps": 5})
    with pytest.raises(ConfigError, match="a step budget, or clients choosing their own"):
        run_experiment(cfg, INLINE, tmp_path / "logs", False)

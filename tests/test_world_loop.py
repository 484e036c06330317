"""The world inside the loops: virtual time, deadlines and over-selection by hand, selection
policies, faults counted in the events table, asynchronous FL schedules worked by hand."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from engine.backends.runtime import RuntimeOptions
from engine.compute.training import LocalSGD
from engine.core.errors import ConfigError
from engine.core.seeds import SeedTree
from engine.experiment import run_experiment
from engine.loops.world import SyncWorld
from engine.protocols.worlds import build_world
from engine.records.logs import read_table
from engine.resolve import resolve
from policies.selection import over_selection, power_of_choice
from tests.conftest import small_config

INLINE = RuntimeOptions("inline")
P_BYTES = 1000  # model bytes in the hand-worked plans


def devices_file(tmp_path, step_s, up_bps=1e9, down_bps=1e9, latency_s=0.0):
    n = len(step_s)
    rows = ["client_id,step_s,up_bps,down_bps,latency_s"]
    rows += [f"{i},{step_s[i]},{_at(up_bps, i)},{_at(down_bps, i)},{_at(latency_s, i)}"
             for i in range(n)]
    path = tmp_path / "devices.csv"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def _at(value, i):
    return value[i] if isinstance(value, list | tuple) else value


def world_of(cfg, sizes, seeds=None) -> SyncWorld:
    hp = LocalSGD(cfg.training.local_epochs, cfg.training.batch_size, cfg.training.lr)
    assert seeds is None or seeds.seed == cfg.seed
    return build_world(cfg, np.asarray(sizes), hp, P_BYTES, resolve(cfg))


def test_a_round_lasts_until_its_slowest_reporting_client(tmp_path):
    """4 clients, all selected: task = latency + bytes/down + steps * step_s + bytes/up.
    Client 3's 1000 B at 500 B/s up adds 2 s; sizes 20 and batch 8 give 3 steps."""
    path = devices_file(tmp_path, [0.1, 0.2, 0.3, 0.1], up_bps=[1e9, 1e9, 1e9, 500.0],
                        latency_s=0.5)
    cfg = small_config(population={"num_clients": 4, "participation":
                                   {"clients_per_round": 4}}, devices={"path": path})
    plan = world_of(cfg, [20, 20, 20, 20]).plan(0)
    expected = 0.5 + 1000 / 1e9 + 2 * 3 * np.array([0.1, 0.2, 0.3, 0.1]) \
        + np.array([1e-6, 1e-6, 1e-6, 2.0])  # 2 epochs of ceil(20 / 8) = 3 steps
    np.testing.assert_allclose(plan.task_s, expected)
    assert plan.steps.tolist() == [6, 6, 6, 6]
    assert plan.duration_s == pytest.approx(expected.max())
    assert plan.status.tolist() == ["completed"] * 4
    assert plan.bytes == 8 * P_BYTES


def test_a_deadline_drops_exactly_the_late_clients(tmp_path):
    path = devices_file(tmp_path, [0.1, 0.4, 0.2, 0.5])
    cfg = small_config(population={"num_clients": 4, "participation":
                                   {"clients_per_round": 4}}, devices={"path": path},
                       selection={"deadline_s": 1.5})  # tasks: 0.6, 2.4, 1.2, 3.0 s
    plan = world_of(cfg, [20] * 4).plan(0)
    assert plan.status.tolist() == ["completed", "straggler", "completed", "straggler"]
    assert plan.duration_s == 1.5 and plan.kept.tolist() == [0, 2]
    assert plan.events.kind.tolist() == ["straggler", "straggler"]
    assert plan.events.client_id.tolist() == [1, 3]


def test_over_selection_keeps_the_first_k_to_report(tmp_path):
    path = devices_file(tmp_path, [0.5, 0.1, 0.4, 0.2, 0.3])
    cfg = small_config(population={"num_clients": 5, "participation":
                                   {"clients_per_round": 3}}, devices={"path": path},
                       selection={"kind": "over_selection", "factor": 1.5})
    plan = world_of(cfg, [20] * 5).plan(0)  # ceil(1.5 * 3) = 5 selected
    assert plan.selected.tolist() == [0, 1, 2, 3, 4]
    assert plan.kept.tolist() == [1, 3, 4]  # the three fastest
    assert plan.duration_s == pytest.approx(6 * 0.3 + 2e-6)  # the third arrival
    assert plan.status.tolist() == ["over_selected", "completed", "over_selected",
                                    "completed", "completed"]


def test_selection_policies_by_hand():
    rng = np.random.default_rng(0)
    losses = np.array([0.1, 5.0, np.inf, 0.3, 2.0, 0.2])
    assert over_selection(1.3).choose(np.arange(10), 4, losses, rng).size == 6
    # d = 6 candidates (all of them): the 3 highest losses, never-seen (inf) first
    assert power_of_choice(6).choose(np.arange(6), 3, losses, rng).tolist() == [1, 2, 4]
    picked = power_of_choice(3).choose(np.arange(6), 2, losses, np.random.default_rng(1))
    assert picked.size == 2


def test_faults_are_seeded_and_counted_in_the_events_table(tmp_path):
    """A 50% crash rate (crash-recover) and every message fault at once: the run completes,
    and the events table holds exactly the faults a replay of the world injects."""
    cfg = small_config(rounds=8, population={"num_clients": 20, "participation":
                                             {"clients_per_round": 5}},
                       failures={"crash": {"rate": 0.5, "downtime": {"kind": "constant",
                                                                      "value": 2}},
                                 "dropout_before": 0.1, "dropout_after": 0.1,
                                 "message_loss": 0.1})
    result = run_experiment(cfg, INLINE, tmp_path, False)
    assert result.loop.rounds_done == 8
    events = read_table(result.log_dir, "events")
    counted = {k["kind"]: k["client_id_count"] for k in
               events.group_by("kind").aggregate([("client_id", "count")]).to_pylist()}
    from engine.core.params import init_params
    from engine.resolve import build_task

    seeds = SeedTree(cfg.seed)
    task = build_task(cfg)
    params = init_params(task.model.build, seeds.integer("init"))
    world = world_of(cfg, task.client_sizes, seeds)
    world.transfer = params.numel() * 4
    injected: dict[str, int] = {}
    for r in range(cfg.rounds):
        for kind in world.plan(r).events.kind:
            injected[kind] = injected.get(kind, 0) + 1
    assert counted == injected and counted["crash"] > 10
    clients = read_table(result.log_dir, "clients")
    faulted = clients.filter(pc.invert(pc.equal(clients["status"], "completed")))
    assert faulted.num_rows == sum(v for k, v in counted.items()
                                   if k not in ("crash", "recover"))


def test_crashed_clients_are_never_selected(tmp_path):
    cfg = small_config(rounds=6, population={"num_clients": 20, "participation":
                                             {"clients_per_round": 10}},
                       failures={"crash": {"rate": 0.3}})  # crash-stop
    result = run_experiment(cfg, INLINE, tmp_path, False)
    events = read_table(result.log_dir, "events").to_pylist()
    crashed_at = {e["client_id"]: e["round"] for e in events if e["kind"] == "crash"}
    assert not any(e["kind"] == "recover" for e in events)
    for row in read_table(result.log_dir, "clients").to_pylist():
        assert row["client_id"] not in crashed_at or row["round"] <= crashed_at[row["client_id"]]


def async_config(tmp_path, mode, step_s, **server):
    """Clients of 1 step (a batch larger than any client, 1 epoch): task = step_s."""
    n = len(step_s)
    return small_config(
        rounds=6, eval_every=0,
        population={"num_clients": n},
        training={"local_epochs": 1, "batch_size": 4096},
        devices={"path": devices_file(tmp_path, step_s)},
        server={"mode": mode, "concurrency": n, **server})


def _versions(result):
    clients = read_table(result.log_dir, "clients").sort_by([("round", "ascending"),
                                                             ("client_id", "ascending")])
    rounds = read_table(result.log_dir, "rounds").sort_by("round")
    return clients, rounds


def test_fedasync_staleness_follows_the_hand_worked_schedule(tmp_path):
    """Two clients, always busy: A takes 1.0 s, B 2.5 s. Arrivals (time, client, version at
    dispatch, version now): 1.0 A 0 0 | 2.0 A 1 1 | 2.5 B 0 2 | 3.0 A 2 3 | 4.0 A 4 4 |
    5.0 B 3 5 (A, dispatched at 4.0, also lands at 5.0: the earlier dispatch goes first)."""
    result = run_experiment(async_config(tmp_path, "fedasync", [1.0, 2.5]), INLINE,
                            tmp_path / "logs", False)
    clients, rounds = _versions(result)
    assert clients["client_id"].to_pylist() == [0, 0, 1, 0, 0, 1]
    assert clients["staleness"].to_pylist() == [0, 0, 2, 1, 0, 2]
    np.testing.assert_allclose(rounds["virtual_time"].to_numpy(), [1, 2, 2.5, 3, 4, 5],
                               atol=1e-4)


def test_fedbuff_aggregates_exactly_every_b_arrivals(tmp_path):
    result = run_experiment(async_config(tmp_path, "fedbuff", [1.0, 1.7, 2.3, 3.1], buffer=3),
                            INLINE, tmp_path / "logs", False)
    clients, rounds = _versions(result)
    assert rounds["num_updates"].to_pylist() == [3] * 6
    assert clients.group_by("round").aggregate([("client_id", "count")])[
        "client_id_count"].to_pylist() == [3] * 6
    times = rounds["virtual_time"].to_numpy()
    assert np.all(np.diff(times) > 0)  # events in time order


def test_fedfix_aggregates_on_its_interval(tmp_path):
    result = run_experiment(async_config(tmp_path, "fedfix", [0.3, 0.7, 1.1],
                                         interval_s=1.0), INLINE, tmp_path / "logs", False)
    _, rounds = _versions(result)
    np.testing.assert_allclose(rounds["virtual_time"].to_numpy(), [1, 2, 3, 4, 5, 6])
    # in [0, 1]: 0.3, 0.6, 0.9 (client 0), 0.7 (client 1): 4 updates; client 2 lands at 1.1
    assert rounds["num_updates"].to_pylist()[0] == 4


def test_async_modes_refuse_what_needs_synchronous_rounds():
    """A stage or client variant defined over synchronous rounds is refused, with the
    reason; any other chain composes."""
    for mode, aggregation, reason in [
            ("fedbuff", "fedau", "participation interval over synchronous rounds"),
            ("fedasync", {"krum": {"f": 1}}, "at least 5 updates .* has at most 1"),
            ("fedbuff", {"bulyan": {"f": 2}}, "at least 11 updates .* has at most 10")]:
        with pytest.raises(ConfigError, match=reason):
            run_experiment(small_config(server={"mode": mode}, aggregation=aggregation),
                           INLINE)
    with pytest.raises(ConfigError, match="no round to close"):
        run_experiment(small_config(server={"mode": "fedbuff"},
                                    selection={"kind": "over_selection"}), INLINE)


def test_async_scaffold_moves_the_server_control_by_each_aggregated_delta(tmp_path):
    """One client: the server's c moves by the client's own delta c_i as each update lands,
    so c - c_i is exactly 0 at every dispatch and the run equals the plain one; with two
    clients the correction is not 0 and the run differs."""
    one = {"training": {"local_epochs": 1, "batch_size": 4096, "lr": 0.1}}
    runs = {}
    for clients in ([1.0], [1.0, 2.5]):
        for scaffold in (False, True):
            cfg = async_config(tmp_path, "fedasync", clients, alpha=1.0,
                               staleness={"kind": "constant"})
            cfg = cfg.model_copy(update={"training": cfg.training.model_copy(
                update={"scaffold": scaffold, **one["training"]})})
            runs[len(clients), scaffold] = run_experiment(
                cfg, INLINE, tmp_path / f"{len(clients)}{scaffold}", False).loop.params
    assert torch.equal(runs[1, False], runs[1, True])
    assert not torch.equal(runs[2, False], runs[2, True])


def test_fedau_runs_end_to_end_under_unknown_participation(tmp_path):
    cfg = small_config(rounds=5, aggregation="fedau",
                       population={"num_clients": 20, "participation": {"fraction": 1.0},
                                   "availability": {"kind": "bernoulli", "probability": {
                                       "kind": "uniform", "low": 0.1, "high": 0.9}}})
    result = run_experiment(cfg, INLINE, tmp_path, False)
    assert math.isfinite(result.loop.final_accuracy)
    clients = read_table(result.log_dir, "clients")
    per_round = clients.group_by("round").aggregate([("client_id", "count")])
    assert 1 < np.mean(per_round["client_id_count"].to_numpy()) < 20  # only the online ones


def test_lost_messages_keep_mixing_stochastic():
    """A lost message's weight stays with the receiver (row-stochastic mixing) or with the
    sender (push-sum); dead peers are identity rows."""
    from engine.core.config import FailuresConfig
    from engine.protocols.worlds import build_network
    from tests.conftest import small_config

    alive = np.ones(12, dtype=bool)
    alive[[3, 7]] = False
    failures = FailuresConfig(message_loss=0.3, link_failure=0.1)
    for kind, axis in [("metropolis_hastings", 1), ("push_sum", 0)]:
        cfg = small_config(
            seed=3, mode="decentralized", population={"num_clients": 12},
            topology={"kind": "torus"}, gossip={"mixing": kind},
            consensus="push_sum" if kind == "push_sum" else "gossip")
        net = build_network(cfg, resolve(cfg))
        w, events = net.faulty_mixing(2, alive, failures)
        dense = w.toarray()
        np.testing.assert_allclose(dense.sum(axis=axis), 1.0, atol=1e-12)
        assert dense[3, 3] == 1 and dense[3].sum() == 1 and dense[:, 7].sum() == 1
        lost = events.client_id[events.kind == "message_lost"]
        senders = events.value[events.kind == "message_lost"].astype(int)
        assert lost.size > 0 and np.all(dense[lost, senders] == 0)
        clean = net.faulty_mixing(2, alive, FailuresConfig(link_failure=0.1))[0].toarray()
        assert np.count_nonzero(clean) - np.count_nonzero(dense) == lost.size


def test_gossip_with_crashes_and_lost_messages_logs_every_fault(tmp_path):
    """The issue's command, small: D-SGD on a ring with crash-recover peers and lost
    messages completes; the events table equals a replay of the faults."""
    from engine.core.config import build_config
    from engine.protocols.worlds import build_network
    from scenarios.failures import Liveness
    from tests.conftest import small_raw

    raw = small_raw(mode="decentralized", rounds=6, population={"num_clients": 12},
                    topology={"kind": "ring"}, gossip={"eval_peers": 4},
                    failures={"crash": {"rate": 0.2, "downtime": {"kind": "constant",
                                                                   "value": 2}},
                              "message_loss": 0.2, "link_failure": 0.1})
    raw["population"].pop("participation", None)
    cfg = build_config(raw)
    result = run_experiment(cfg, INLINE, tmp_path, False)
    table = read_table(result.log_dir, "events")
    seeds = SeedTree(cfg.seed)
    net = build_network(cfg, resolve(cfg))
    live = Liveness(cfg.failures, 12, seeds, resolve(cfg).downtime)
    expected = []
    for r in range(cfg.rounds):
        alive, events = live.step(r)
        expected += list(events.kind) + list(net.faulty_mixing(r, alive, cfg.failures)[1].kind)
    kinds = table["kind"].to_pylist()
    assert sorted(kinds) == sorted(expected) and kinds.count("message_lost") > 0
    assert {"crash", "link_down"} <= set(kinds)


@pytest.mark.parametrize("world", [
    {"training": {"max_local_steps": 5, "min_local_steps": 1}},
    {"population": {"num_clients": 20, "participation": {"fraction": 1.0}, "availability": {
        "kind": "anarchic", "probability": {"kind": "constant", "value": 0.6},
        "steps": {"kind": "uniform", "low": 1, "high": 12}}}},
])
def test_the_steps_timed_are_the_steps_trained(tmp_path, world):
    """Virtual time uses the world's step counts: they must be what the pools ran (step
    budgets drawn per client and round; anarchic clients' own choices)."""
    cfg = small_config(rounds=3, **world)
    result = run_experiment(cfg, INLINE, tmp_path, False)
    logged = read_table(result.log_dir, "clients").sort_by([("round", "ascending"),
                                                             ("client_id", "ascending")])
    from engine.resolve import build_task

    task = build_task(cfg)
    batch = min(cfg.training.batch_size, int(task.client_sizes.max()))
    t = cfg.training
    hp = LocalSGD(t.local_epochs, batch, t.lr, max_steps=t.max_local_steps,
                  min_steps=t.min_local_steps)
    world_ = build_world(cfg, task.client_sizes, hp, P_BYTES, resolve(cfg))
    planned = np.concatenate([world_.plan(r).steps for r in range(cfg.rounds)])
    assert logged["local_steps"].to_pylist() == planned.tolist()
    assert len(set(planned.tolist())) > 2  # the steps do vary


def test_faulty_gossip_is_the_same_on_ray_with_two_pools(tmp_path, ray_cluster):
    """Crash-stop peers empty a whole pool's block: Ray with 2 pools and inline with 1 give
    the same models."""
    from engine.core.config import build_config
    from tests.conftest import small_raw

    raw = small_raw(mode="decentralized", rounds=5, population={"num_clients": 8},
                    topology={"kind": "ring"}, gossip={"eval_peers": 4},
                    failures={"crash": {"rate": 0.35}, "message_loss": 0.2})
    raw["population"].pop("participation", None)
    cfg = build_config(raw)
    on_ray = run_experiment(cfg, RuntimeOptions("ray", 2, reuse_actors=True), tmp_path / "ray",
                            False)
    inline = run_experiment(cfg, INLINE, tmp_path / "inline", False)
    crashed = read_table(on_ray.log_dir, "events")["kind"].to_pylist().count("crash")
    assert crashed >= 5
    np.testing.assert_array_equal(on_ray.loop.params, inline.loop.params)
    assert on_ray.loop.consensus_distance == inline.loop.consensus_distance


def test_a_round_with_fewer_updates_than_the_rule_needs_keeps_the_model(tmp_path):
    """Krum with f = 1 is defined on K >= 5 updates: when dropouts leave fewer, the server
    skips the step (the model, hence its test loss, stays) instead of failing the run."""
    cfg = small_config(rounds=8, aggregation={"krum": {"f": 1}},
                       failures={"dropout_after": 0.4})
    result = run_experiment(cfg, INLINE, tmp_path, False)
    rounds = read_table(result.log_dir, "rounds").sort_by("round").to_pylist()
    short = [i for i, r in enumerate(rounds) if r["num_updates"] < 5 and i > 0]
    assert short and len(short) < len(rounds) - 1
    for i in short:
        assert rounds[i]["test_loss"] == rounds[i - 1]["test_loss"]

"""The protocol registry (engine/protocols): each protocol's keys select it, a setting of a
part it does not consume is refused at load in one line, defaults never are, stages get the
update columns they need or are refused, and a chain that reduces to FedAvg's over one update
says so and gives FedAvg's bits."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from engine import compatibility as compat
from engine.backends.runtime import RuntimeOptions
from engine.contracts import sample_validation
from engine.core.config import apply_override, build_config, parse_override
from engine.core.errors import ConfigError
from engine.core.updates import Updates
from engine.experiment import prepare, run_experiment
from engine.protocols import ALL, PROTOCOLS, in_matrix, protocol_of
from engine.protocols.base import PARTS, changed_paths, part_of
from engine.resolve import CATALOG, load, resolve
from policies.aggregation import weighted_mean
from policies.base import Aggregator, stage, stateless
from policies.registry import AGGREGATION
from tests.conftest import ROOT

INLINE = RuntimeOptions("inline", 1)

# one non-default setting of every part (a new part must add one here)
SETTING = {
    "server": "server.concurrency=3",
    "aggregation": "aggregation=trimmed_mean",
    "participation": "population.participation.clients_per_round=4",
    "selection": "selection.kind=power_of_choice",
    "deadline": "selection.deadline_s=1.0",
    "scaffold": "training.scaffold=true",
    "compression": "training.compression.kind=topk",
    "error_feedback": "training.compression.error_feedback=false",
    "controlled_compression": "training.compression.beta=0.5",
    "local_steps": "training.local_epochs=3",
    "dropouts": "failures.dropout_before=0.1",
    "link_failure": "failures.link_failure=0.1",
    "topology": "topology.kind=torus",
    "mixing": "gossip.mixing=max_degree",
    "gossip_steps": "gossip.steps=2",
    "clocks": "gossip.asynchronous.edge_rate=2.0",
    "gossip": "gossip.final_merge=true",
    "consensus": "consensus=monna",
    "platform": "server.platform.kind=lifl",
    "streaming": "training.streaming.fragments=2",
}


def _raw(protocol, *overrides: str) -> dict:
    raw = compat._merged(compat.TINY, dict(protocol.example))
    for text in overrides:
        apply_override(raw, *parse_override(text), CATALOG)
    return raw


def test_every_part_has_a_setting_and_every_setting_its_part():
    assert set(SETTING) == set(PARTS)
    for part, text in SETTING.items():
        assert part_of(text.split("=")[0]) == part


@pytest.mark.parametrize("protocol", in_matrix(), ids=lambda p: p.label)
def test_the_example_selects_its_protocol(protocol):
    cfg = build_config(_raw(protocol))
    plugins = resolve(cfg)
    assert plugins.protocol is protocol
    assert protocol_of(cfg, plugins.server, plugins.consensus) is protocol


@pytest.mark.parametrize("protocol", in_matrix(), ids=lambda p: p.label)
def test_a_part_the_protocol_does_not_consume_is_refused_in_one_line(protocol):
    for part, text in SETTING.items():
        raw = _raw(protocol, text)
        if protocol.uses(part):
            continue
        with pytest.raises(ConfigError) as err:
            resolve(build_config(raw))
        line = str(err.value)
        assert "\n" not in line
        key = line.split(":")[0]
        assert part_of(key) == part and text.startswith(key), (part, line)
        assert f"{protocol.label} does not use it" in line, (part, line)


@pytest.mark.parametrize("protocol", in_matrix(), ids=lambda p: p.label)
def test_every_value_written_out_at_its_default_loads(protocol):
    """A config with every key written (as the runs table's config_yaml has it) is not a
    setting of anything: it loads for every protocol."""
    cfg = build_config(_raw(protocol))
    again = build_config(cfg.to_dict())
    assert resolve(again).protocol is protocol
    assert all(protocol.uses(part_of(p)) for p in changed_paths(again))


def test_the_issue_commands_exit_2_with_one_line(tmp_path):
    for args, key in [(["configs/gossip_ring.yaml", "aggregation=krum"], "aggregation"),
                      (["configs/quickstart.yaml", "topology.kind=torus"], "topology.kind")]:
        out = subprocess.run([sys.executable, "run.py", *args, "--log-dir", str(tmp_path)],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stderr
        assert out.stderr.count("\n") == 1 and out.stderr.startswith(f"error: {key}:")
        assert not (tmp_path / "gossip_ring").exists() and not (tmp_path / "quickstart").exists()


def test_registry_lists_every_protocol_once():
    assert [p.name for p in ALL] == list(PROTOCOLS.entries)
    assert len({p.label for p in ALL}) == len(ALL)
    assert [p.label for p in in_matrix()] == list(compat.NAMES)


@stage("reduction", needs=("staleness",))
def staleness_mean() -> Aggregator:
    """A test stage that reads the staleness column."""
    def reduce(u: Updates) -> torch.Tensor:
        assert u.staleness is not None
        return (u.deltas * u.weights[:, None]).sum(0) / u.weights.sum()
    return stateless(reduce)


def test_a_stage_needing_a_column_the_protocol_does_not_carry_is_refused():
    sync = compat.PROTOCOLS[0]
    cfg = build_config(_raw(sync, "aggregation=tests.test_protocols:staleness_mean"))
    with pytest.raises(ConfigError, match="reads staleness from the updates"):
        prepare(cfg)
    fedbuff = next(p for p in compat.PROTOCOLS if p.name == "fedbuff")
    prepare(build_config(_raw(fedbuff, "aggregation=tests.test_protocols:staleness_mean")))


def _one_update() -> Updates:
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(1, 12, generator=g) * 50  # large: clipping and noise would show
    return Updates(client_ids=torch.tensor([4]), deltas=delta,
                   weights=torch.tensor([7.0]), num_samples=torch.tensor([7]),
                   losses=torch.tensor([0.5]), steps=torch.tensor([3]),
                   label_counts=torch.tensor([[3, 4, 0]]), fisher=torch.rand(1, 12,
                                                                              generator=g),
                   staleness=torch.tensor([0]))


@pytest.mark.parametrize("name", [n for n in AGGREGATION.names()
                                  if AGGREGATION[n].stage_kind in ("transform", "reduction")])
def test_mean_of_one_is_exactly_the_stages_that_give_the_mean_of_one_update(name):
    """`mean_of_one` marks a stage exactly when, on a single update, it gives that update's
    weighted mean: the engine's "reduces to fedavg" note rests on it."""
    factory = AGGREGATION[name]
    params = {"f": 0} if name in ("krum", "multi_krum", "bulyan") else {}
    built = AGGREGATION.make(name, None, {"num_clients": 10, "seed": 1,
                                          "validation": sample_validation}, **params)
    if built.min_updates > 1:  # not defined on one update: refused where steps have one
        assert not factory.mean_of_one
        return
    u = _one_update()
    params_vec = torch.zeros(12)
    out, _ = built.update(u, built.init(params_vec))
    if factory.stage_kind == "transform":
        mean = weighted_mean()
        out, _ = mean.update(out, mean.init(params_vec))
    same = torch.allclose(out.double(), u.deltas[0].double(), rtol=1e-5, atol=1e-4)
    assert same == factory.mean_of_one, name


def test_a_robust_rule_over_fedasync_says_it_is_fedavg_and_gives_its_bits(tmp_path):
    base = ["server.mode=fedasync", "rounds=6", "eval_every=3"]
    robust = load(ROOT / "configs" / "fedbuff_async.yaml", [*base, "aggregation=trimmed_mean"])
    plain = load(ROOT / "configs" / "fedbuff_async.yaml", [*base, "aggregation=fedavg"])
    (note,) = prepare(robust).mode.notes
    assert "FedAsync" in note and "aggregation=fedavg's results" in note
    assert prepare(plain).mode.notes == ()
    a = run_experiment(robust, INLINE, tmp_path / "a", False).loop.params.numpy()
    b = run_experiment(plain, INLINE, tmp_path / "b", False).loop.params.numpy()
    np.testing.assert_array_equal(a, b)
    out = subprocess.run([sys.executable, "run.py", "configs/fedbuff_async.yaml", *base,
                          "aggregation=trimmed_mean", "--backend", "inline", "--log-dir",
                          str(tmp_path / "c")], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("note: aggregation with FedAsync") == 1


def _sweep(tmp_path, grid: str):
    path = tmp_path / "s.yaml"
    path.write_text(f"base: {ROOT / 'configs' / 'fedbuff_async.yaml'}\n"
                    f"set: {{rounds: 2, eval_every: 1}}\ngrid:\n{grid}")
    return path


def test_a_sweep_names_each_refused_run_at_dry_run_and_does_not_start(tmp_path):
    path = _sweep(tmp_path, "  server.mode: [sync, fedasync, fedbuff]\n"
                            "  aggregation: [fedavg, trimmed_mean, krum, fedau]\n")
    cmd = [sys.executable, "run.py", "sweep", str(path), "--log-dir", str(tmp_path / "logs")]
    dry = subprocess.run([*cmd, "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert dry.returncode == 2, dry.stderr
    lines = dry.stdout.splitlines()
    refused = [line for line in lines[:-1] if " refused " in line]
    # krum under FedAsync (one update a step), FedAU under both asynchronous rules
    assert len(refused) == 3
    assert any("server.mode=fedasync aggregation=krum" in r and "at least" in r
               for r in refused)
    assert sum("aggregation=fedau" in r and "FedAU" in r for r in refused) == 2
    assert any("note:" in line and "aggregation=trimmed_mean" in line for line in lines)
    assert "12 runs" in lines[-1] and "3 refused" in lines[-1]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stderr.count("\n") == 1
    assert "and 2 more refused runs" in run.stderr
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").rglob("*.parquet"))


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_is_accepted_as_it_stands(path):
    """The engine prepares every shipped config (its task, world and protocol's runner)
    without a refusal: a config that only fails when run is caught here. Scale configs
    (over 20,000 clients) are prepared at 2,000 clients: the same task, world and runner,
    without generating 100k clients' data in the test process."""
    cfg = load(path)
    if cfg.population.num_clients > 20_000:
        cfg = load(path, ["population.num_clients=2000"])
    prepare(cfg)

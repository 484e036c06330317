import re

import pytest

from engine.core.config import build_config, load_config, parse_override
from engine.core.errors import ConfigError
from engine.resolve import load, resolve
from tests.conftest import ROOT


def test_overrides_are_typed_by_yaml():
    assert parse_override("population.num_clients=5000") == (["population", "num_clients"], 5000)
    assert parse_override("training.lr=0.1") == (["training", "lr"], 0.1)
    assert parse_override("experiment=abc") == (["experiment"], "abc")


def test_scientific_floats_are_floats(tmp_path):
    assert parse_override("training.lr=1e-3") == (["training", "lr"], 0.001)
    path = tmp_path / "c.yaml"
    path.write_text("training: {lr: 5e-2}\n")
    assert load_config(path).training.lr == 0.05


def test_non_utf8_file_is_a_config_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"rounds: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not a UTF-8 text file"):
        load_config(path)


def test_dotted_overrides_reach_nested_keys():
    cfg = load_config(ROOT / "configs/quickstart.yaml",
                      ["rounds=50", "population.num_clients=5000", "seed=3"])
    assert (cfg.rounds, cfg.population.num_clients, cfg.seed) == (50, 5000, 3)


@pytest.mark.parametrize("raw, message", [
    ({"training": {"foo": 1}}, "training.foo: unknown key"),
    ({"rounds": "5"}, "rounds: Input should be a valid integer"),
    ({"training": {"lr": -0.1}}, "training.lr: Input should be greater than 0"),
    ({"population": {"participation": {"fraction": 1.5}}},
     "population.participation.fraction: Input should be less than or equal to 1"),
    ({"population": {"num_clients": 5, "participation": {"clients_per_round": 10}}},
     "clients_per_round=10 exceeds num_clients=5"),
    ({"population": {"participation": {"fraction": 0.5, "clients_per_round": 3}}},
     "set exactly one of clients_per_round or fraction"),
    ({"seed": 2**64}, "seed: integer out of range"),
    ({"seed": 2**63 - 1 + 1}, "seed: integer out of range"),
])
def test_bad_values_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as err:
        build_config(raw)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("raw, message", [
    ({"task": {"foo": 1}}, "task.foo: dataset 'digits' takes no parameter 'foo'"),
    ({"aggregation": [1]}, "aggregation[0]: a stage is a name or a mapping (got 1)"),
    ({"topology": {"kind": "ring", "degree": 9}}, "topology.degree: topology 'ring' takes no"),
    ({"selection": {"factor": 5}}, "selection.factor: selection policy 'uniform' takes no"),
    ({"topology": {"kind": "ring", "torus": {"degree": 3}}}, "topology.torus.degree: "),
])
def test_plugin_parameters_are_checked_when_resolved(raw, message):
    """A parameter the chosen kind does not take is named, and so is one kept for another
    kind that that kind does not take either."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve(build_config(raw))


def test_a_kind_switch_keeps_the_old_kinds_parameters_under_its_name():
    cfg = load(ROOT / "configs/digits.yaml", ["task.model.kind=cnn"])
    assert cfg.task.model.items == {"mlp": {"hidden": [64]}}
    cfg = load(ROOT / "configs/fedbuff_async.yaml", ["server.staleness.kind=sqrt"])
    assert cfg.server.items["staleness"] == {"kind": "sqrt", "polynomial": {"a": 0.5}}
    cfg = load(ROOT / "configs/gossip_smallworld.yaml", ["topology.p=0.01",
                                                        "topology.kind=erdos_renyi"])
    assert cfg.topology.items == {"p": 0.01, "small_world": {"k": 4, "beta": 0.1}}


def test_resolved_config_round_trips_through_yaml():
    import yaml

    cfg = load_config(ROOT / "configs/quickstart.yaml")
    assert build_config(yaml.safe_load(cfg.to_yaml())) == cfg
    assert build_config(yaml.safe_load(cfg.to_yaml())).digest() == cfg.digest()


def test_an_override_inside_a_defaulted_plugin_starts_from_its_default():
    """devices.up_bps is {kind: constant, value: 1.25e6} unless set: setting its value, or
    switching its kind, works on that default, as if the config had written it."""
    cfg = load(ROOT / "configs" / "gossip_ring.yaml", ["devices.up_bps.value=100000"])
    assert cfg.devices.up_bps == {"kind": "constant", "value": 100000}
    assert resolve(cfg).devices["up_bps"] is not None
    switched = load(ROOT / "configs" / "gossip_ring.yaml", [
        "devices.up_bps.kind=lognormal", "devices.up_bps.median=1e5",
        "devices.up_bps.sigma=1"])
    assert switched.devices.up_bps["constant"] == {"value": 1250000.0}
    assert resolve(switched).devices["up_bps"] is not None

"""Scenario configs: YAML + dotted overrides -> typed, validated, frozen objects.

This is the config boundary: raw dicts and strings stop here. Every error becomes a
``ConfigError`` whose message is one line naming the offending key and what is allowed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from engine.core.errors import SHOWN_CHARS, ConfigError, shown

MAX_CONFIG_BYTES = 1 << 20  # config and sweep files over 1 MiB are refused before parsing
MAX_OVERRIDE_CHARS = 1 << 16  # a `key=value` argument over 64 KiB is refused before parsing
MAX_DEPTH = 32  # YAML nesting deeper than this is refused while composing
MAX_VALUES = 100_000  # a config expanding (through YAML aliases) to more values is refused
FLOAT32_MAX = 3.4028234663852886e38  # configs feed float32 arithmetic: larger values overflow
INT64_MAX = 2**63 - 1
EXPERIMENT_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"  # one path component: no "..", no "/"


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-3 as a float (YAML 1.1 wants a dot: 1.0e-3), refuses
    duplicate keys (naming the key and its line) and nesting deeper than MAX_DEPTH."""

    _depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise ConfigError(f"line {mark.line + 1}: nested deeper than {MAX_DEPTH} "
                                  "levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, list | dict):
                continue  # unhashable: construct_mapping reports it
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: duplicate key "
                                  f"{shown(key)}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str):
    """Parse YAML text; an integer too long for Python to parse is one ConfigError line."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except ValueError as err:  # e.g. "Exceeds the limit (4300 digits) for integer string"
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"not a usable value: {' '.join(str(err).split())[:SHOWN_CHARS]}"
                          ) from None


def check_structure(raw: Any, where: str = "config") -> None:
    """A parsed config is a finite tree: no value contains itself (a recursive YAML alias,
    `&a [*a]`), and with aliases expanded it has at most MAX_VALUES values (a "billion laughs"
    file of nested aliases is a few hundred bytes). Walked iteratively, stopping at the
    bound, so neither case costs more than MAX_VALUES steps."""
    stack: list[tuple[Any, str, frozenset[int]]] = [(raw, "", frozenset())]
    seen = 0
    while stack:
        node, path, ancestors = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise ConfigError(f"{where}: expands to more than {MAX_VALUES:,} values (nested "
                              "YAML aliases?)")
        if not isinstance(node, dict | list):
            continue
        if id(node) in ancestors:
            at = ": ".join(part for part in (where if where != "config" else "", path) if part)
            raise ConfigError(f"{at or where}: a recursive YAML alias (a value that contains "
                              "itself)")
        inner = ancestors | {id(node)}
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            child = f"{path}.{key}" if isinstance(node, dict) and path else (
                str(key) if isinstance(node, dict) else f"{path}[{key}]")
            stack.append((value, child, inner))


def check_numbers(raw: Any, where: str = "") -> None:
    """Every number of a raw config is finite and fits what it feeds: floats within float32's
    range (no NaN or inf), integers within int64. The first bad one is a ConfigError naming
    its key."""
    if isinstance(raw, dict):
        for key, value in raw.items():
            check_numbers(value, f"{where}.{key}" if where else str(key))
    elif isinstance(raw, list):
        for i, value in enumerate(raw):
            check_numbers(value, f"{where}[{i}]")
    elif isinstance(raw, float) and not (math.isfinite(raw) and abs(raw) <= FLOAT32_MAX):
        raise ConfigError(f"{where or 'config'}: must be a finite number within float32's "
                          f"range (|x| <= 3.4e38), got {shown(raw)}")
    elif isinstance(raw, int) and not isinstance(raw, bool) and abs(raw) > INT64_MAX:
        raise ConfigError(f"{where or 'config'}: integer out of range (|x| < 2^63), got "
                          f"{shown(raw)}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class PluginSection(_Strict):
    """A config section that names a plugin: the kind under KIND_KEY, the section's own fields,
    and, as the other keys, the kind's parameters (and parameters kept under other kinds'
    names, engine/core/plugins.py). The registry that resolves the kind checks those."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    KIND_KEY: ClassVar[str] = "kind"

    @property
    def chosen(self) -> str:
        return getattr(self, self.KIND_KEY)

    @property
    def items(self) -> dict[str, Any]:
        """The plugin's parameters as written (its own, and others' under their names)."""
        return dict(self.model_extra or {})


class SupermaskConfig(_Strict):
    """A supermask model (scenarios/supermask.py): fixed random weights, one trained score per
    weight, and each layer uses only its top `keep` fraction of edges (FRL's k)."""

    keep: float = Field(0.5, gt=0, le=1, description="fraction of each layer's edges kept")
    by_magnitude: bool = Field(True, description="rank edges by |score| (FRL's code), "
                                                 "else by the signed score (FRL's paper text)")


class ModelConfig(PluginSection):
    """The model (scenarios/models.py MODELS: logistic, mlp, cnn) and its parameters."""

    kind: str = "mlp"
    supermask: SupermaskConfig | None = None  # None: a dense model whose weights train


class TaskConfig(PluginSection):
    """The dataset (scenarios/datasets.py DATASETS, e.g. digits, synthetic) with its
    parameters (under the dataset's name, e.g. `task.synthetic.alpha`), and the model."""

    KIND_KEY: ClassVar[str] = "dataset"
    dataset: str = "digits"
    model: ModelConfig = ModelConfig()
    test_fraction: float = Field(0.2, gt=0, lt=1)
    max_test_samples: int = Field(10_000, ge=1, le=10**9)
    # a share of each client's training samples kept at the server as a validation split,
    # for stages that score models on held-out data (greedy_soup); 0: none
    validation_fraction: float = Field(0.0, ge=0, lt=1)


class PartitionConfig(PluginSection):
    """How training samples are split over clients (scenarios/partition.py PARTITIONS)."""

    kind: str = "iid"


class ParticipationConfig(_Strict):
    """Uniform participation: exactly one of clients_per_round (K of N) or fraction."""

    clients_per_round: int | None = Field(None, ge=1, le=10**9)
    fraction: float | None = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> ParticipationConfig:
        if (self.clients_per_round is None) == (self.fraction is None):
            raise ValueError("set exactly one of clients_per_round or fraction")
        return self


class AvailabilityConfig(PluginSection):
    """Who is online in each slot (scenarios/availability.py AVAILABILITY); a slot is a round,
    or `slot_s` virtual seconds in asynchronous runs. The server never sees the rates."""

    kind: str = "always"
    slot_s: float = Field(1.0, gt=0, description="virtual seconds per slot (async runs)")


class PopulationConfig(_Strict):
    num_clients: int = Field(100, ge=1, le=10**9)
    # unset: 10% of the clients per round in federated runs, every peer in decentralized ones
    participation: ParticipationConfig | None = None
    availability: AvailabilityConfig = AvailabilityConfig()

    @model_validator(mode="after")
    def _k_fits(self) -> PopulationConfig:
        k = None if self.participation is None else self.participation.clients_per_round
        if k is not None and k > self.num_clients:
            raise ValueError(
                f"participation.clients_per_round={k} exceeds num_clients={self.num_clients}"
            )
        return self


class CompressionConfig(PluginSection):
    """Update compression (policies/compression.py COMPRESSORS) and error feedback (a
    residual per client, kept in the pools)."""

    kind: str = "none"
    error_feedback: bool = True
    # SCALLION / SCAFCOM (Huang, Li & Li, 2024): compress SCAFFOLD's single uplink instead
    controlled: Literal["scallion", "scafcom"] | None = Field(
        None, description="compress SCAFFOLD's one uplink vector (needs training.scaffold)")
    alpha: float | None = Field(None, gt=0, le=1, description="SCALLION's step on c_i "
                                "(unset: 1 / (1 + omega) of the unbiased compressor)")
    beta: float | None = Field(None, gt=0, le=1, description="SCAFCOM's momentum weight")


class StreamingConfig(_Strict):
    """Streaming DiLoCo's workers (policies/streaming.py): each keeps its own parameters;
    one of `fragments` slices is synchronised per round, its outer gradient sent with `bits`,
    and the merged fragment mixed in `tau` rounds later (own <- alpha own + (1 - alpha) global)."""

    fragments: int = Field(2, ge=1, le=10**6)
    tau: int = Field(0, ge=0, le=10**6, description="rounds between a fragment's outer step "
                     "and its merge into the workers (the overlap); < fragments")
    alpha: float = Field(0.0, ge=0, lt=1, description="the merge keeps alpha of the worker's own")
    bits: Literal[4, 32] = Field(4, description="4: FP4 E3M0 outer gradients; 32: unquantised")


class TrainingConfig(_Strict):
    executor: Any = Field("vmap", description="executors (engine/compute/training.py)")
    local_epochs: int = Field(1, ge=1, le=10**6)
    batch_size: int = Field(16, ge=1, le=10**9)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1, description="local Polyak momentum (EMA form)")
    prox_mu: float = Field(0.0, ge=0, description="FedProx proximal weight mu (0: plain SGD)")
    max_local_steps: int | None = Field(None, ge=1, le=10**9, description="local-step budget")
    min_local_steps: int | None = Field(None, ge=1, le=10**9, description="with max: budget "
                                        "drawn per client and round in [min, max]")
    scaffold: bool = Field(False, description="SCAFFOLD control variates (federated runs)")
    sam_rho: float = Field(0.0, ge=0, description="SAM radius rho: each local gradient is "
                           "taken at w + rho g / ||g|| (FedSAM, DFedSAM; 0: plain SGD)")
    freeze_features: bool = Field(False, description="train only the output layer (the "
                                  "model's last weight and bias); the feature layers keep "
                                  "the shared initial model's values (Bristle)")
    compression: CompressionConfig = CompressionConfig()
    streaming: StreamingConfig | None = None  # sync FL: Streaming DiLoCo's workers

    @model_validator(mode="after")
    def _budget(self) -> TrainingConfig:
        low, high = self.min_local_steps, self.max_local_steps
        if low is not None and (high is None or low > high):
            raise ValueError(f"min_local_steps={low} needs max_local_steps >= it (got {high})")
        return self


def _constant(value: float) -> Any:
    return Field(default_factory=lambda: {"kind": "constant", "value": value})


class SelectionConfig(PluginSection):
    """Whom the server picks among the available clients (policies/selection.py SELECTION)
    and how long a synchronous round waits for them."""

    kind: str = "uniform"
    deadline_s: float | None = Field(None, gt=0, description="later arrivals are stragglers")


class DevicesConfig(_Strict):
    """Per-client compute and network, each a distribution (scenarios/devices.py
    DISTRIBUTIONS) drawn once. A client's task time is latency + model bytes / down_bps +
    steps * step_s + update bytes / up_bps."""

    step_s: Any = _constant(0.01)
    up_bps: Any = _constant(1.25e6)
    down_bps: Any = _constant(5e6)
    latency_s: Any = _constant(0.05)
    path: str | None = Field(None, description="Parquet/CSV: client_id, step_s, up_bps, "
                                                "down_bps, latency_s (overrides the draws)")


class CrashConfig(_Strict):
    rate: float = Field(0.0, ge=0, le=1, description="P(an up client crashes) per slot")
    downtime: Any = None  # a distribution of slots down; None: crash-stop


class ChurnConfig(_Strict):
    """At slot `at`, a `leave` share of the present clients leaves for good and a `join`
    share of the absent ones joins."""

    at: int = Field(ge=0, le=10**9)
    leave: float = Field(0.0, ge=0, le=1)
    join: float = Field(0.0, ge=0, le=1)


class FailuresConfig(_Strict):
    """Seeded faults (scenarios/failures.py); each one is a row of the events table."""

    dropout_before: float = Field(0.0, ge=0, le=1, description="selected, never trains")
    dropout_after: float = Field(0.0, ge=0, le=1, description="trains, never reports")
    crash: CrashConfig = CrashConfig()
    absent_at_start: float = Field(0.0, ge=0, lt=1, description="churn: not yet joined")
    churn: list[ChurnConfig] = []
    message_loss: float = Field(0.0, ge=0, le=1, description="each model message lost")
    uplink_loss: float | None = Field(None, ge=0, le=1, description="default: message_loss")
    downlink_loss: float | None = Field(None, ge=0, le=1, description="default: message_loss")
    link_failure: float = Field(0.0, ge=0, le=1, description="peers: P(an edge is down) per "
                                                            "round")


class PlatformConfig(PluginSection):
    """How the server's aggregation is hosted, timed in virtual time (scenarios/platforms.py
    PLATFORMS: none, always_on, lifl); the numerical sum does not depend on it."""

    kind: str = "none"


class ServerConfig(PluginSection):
    """How the server runs: `mode` names a server rule (policies/asynchronous.py SERVER_RULES:
    sync, fedasync, fedbuff, fedfix, fedcompass) with its parameters as the other keys."""

    KIND_KEY: ClassVar[str] = "mode"
    mode: str = "sync"
    concurrency: int = Field(10, ge=1, le=10**9, description="async: clients training at "
                             "once (fedcompass: also those waiting for their group)")
    dp_delta: float = Field(1e-5, gt=0, lt=1, description="delta of the (epsilon, delta) "
                            "reported per round with aggregation dp_gaussian")
    platform: PlatformConfig = PlatformConfig()  # sync FL: the aggregators' timing model


class AttackConfig(PluginSection):
    """Byzantine clients: `fraction` of the population, chosen by the seed tree, run attack
    `kind` (scenarios/adversaries.py ATTACKS) with its parameters as the other keys."""

    kind: str = "none"
    fraction: float = Field(0.0, ge=0, le=1)


class OutageConfig(_Strict):
    """A scheduled failure window [start, stop) of rounds: drop a seeded `fraction` of the
    edges, and/or cut the peers into `parts` contiguous id blocks (a network partition)."""

    start: int = Field(ge=0, le=10**9)
    stop: int = Field(ge=1, le=10**9)
    fraction: float = Field(0.0, ge=0, le=1)
    parts: int = Field(0, ge=0, le=10**9)

    @model_validator(mode="after")
    def _window(self) -> OutageConfig:
        if self.stop <= self.start:
            raise ValueError(f"stop={self.stop} must be > start={self.start}")
        return self


class TopologyConfig(PluginSection):
    """The peers' communication graph (scenarios/topology.py TOPOLOGIES): drawn once, or
    redrawn every round (`dynamic: redraw`), minus scheduled outages."""

    kind: str = "ring"
    dynamic: Literal["static", "redraw"] = "static"
    allow_disconnected: bool = False
    outages: list[OutageConfig] = []


class AsyncGossipConfig(_Strict):
    """Poisson clocks in virtual time (DADAO's model): each edge fires pairwise gossip at
    `edge_rate`, each peer takes a local SGD step at `step_rate` (events per unit time)."""

    edge_rate: float = Field(1.0, gt=0, description="pairwise exchanges per edge per unit")
    step_rate: float = Field(1.0, gt=0, description="local SGD steps per peer per unit")
    wake_rate: float = Field(1.0, gt=0, description="wake-ups per peer per unit (policies "
                             "other than plain gossip pull from their neighbours)")


class GossipScheduleConfig(_Strict):
    """How many gossip steps each synchronous round takes (policies/schedules.py): `constant`
    (gossip.steps every round), or a total `budget` spread `uniform`ly, `increasing` with the
    round, or over the `late` rounds (the last `late_fraction` of them)."""

    kind: Literal["constant", "uniform", "increasing", "late"] = "constant"
    budget: int | None = Field(None, ge=0, le=10**9, description="total gossip steps")
    late_fraction: float | None = Field(None, gt=0, le=1, description="kind late: the share "
                                        "of rounds, at the end, that gossip (default 0.5)")


class GossipConfig(_Strict):
    """Decentralized learning: how peers mix, how often, and how they are evaluated."""

    mode: Literal["sync", "async"] = "sync"
    mixing: Any = Field("metropolis_hastings", description="scenarios/mixing.py MIXING")
    steps: int = Field(1, ge=1, le=10**6, description="gossip steps per round")
    schedule: GossipScheduleConfig = GossipScheduleConfig()
    init: Literal["shared", "independent"] = "shared"
    final_merge: bool = False
    # measured on configs/gossip_ring.yaml with topk 0.01: gamma 1 reaches 0.730 (consensus
    # distance 706), 0.3 reaches 0.922 (8.9), 0.1 reaches 0.911 (5.3); uncompressed 0.925
    consensus_step: float = Field(0.3, gt=0, le=1, description="CHOCO-SGD's gamma: with "
                                  "training.compression, x += gamma (mix(x_hat) - x_hat)")
    eval_peers: int = Field(32, ge=0, le=10**9, description="peers evaluated per eval round; "
                            "0: all")
    peer_test_samples: int = Field(500, ge=1, le=10**9)
    asynchronous: AsyncGossipConfig = AsyncGossipConfig()


class ExperimentConfig(_Strict):
    experiment: str = Field("default", pattern=EXPERIMENT_NAME, max_length=100,
                            description="one safe path component: the log folder's name")
    mode: Literal["federated", "decentralized"] = "federated"
    seed: int = Field(0, ge=0, le=2**63 - 1)
    rounds: int = Field(20, ge=1, le=10**8)
    eval_every: int = Field(5, ge=0, le=10**8,
                            description="rounds between evaluations; 0: last round only")
    diverge_after: int = Field(3, ge=0, le=10**8,
                               description="rounds in a row in which every update was dropped "
                               "as non-finite that end the run as diverged; 0: never")
    task: TaskConfig = TaskConfig()
    partition: PartitionConfig = PartitionConfig()
    population: PopulationConfig = PopulationConfig()
    training: TrainingConfig = TrainingConfig()
    attack: AttackConfig = AttackConfig()
    selection: SelectionConfig = SelectionConfig()
    devices: DevicesConfig = DevicesConfig()
    failures: FailuresConfig = FailuresConfig()
    server: ServerConfig = ServerConfig()
    aggregation: Any = "fedavg"  # federated: a stage, or a chain (a list of stages)
    topology: TopologyConfig = TopologyConfig()  # decentralized
    gossip: GossipConfig = GossipConfig()  # decentralized
    consensus: Any = "gossip"  # decentralized: one consensus policy

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def digest(self) -> str:
        """A stable hash of the config (what defines the results, not the runtime)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


# Config sections that name a plugin: path -> section class (its KIND_KEY names the kind).
PLUGIN_SECTIONS: dict[str, type[PluginSection]] = {
    "task": TaskConfig, "task.model": ModelConfig, "partition": PartitionConfig,
    "population.availability": AvailabilityConfig, "training.compression": CompressionConfig,
    "selection": SelectionConfig, "server": ServerConfig, "attack": AttackConfig,
    "topology": TopologyConfig, "server.platform": PlatformConfig,
}


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], value parsed as YAML: 5000 -> int, 0.1 -> float)."""
    if len(text) > MAX_OVERRIDE_CHARS:
        raise ConfigError(f"override {shown(text)}: longer than {MAX_OVERRIDE_CHARS} characters")
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {shown(text)}: expected key=value with a dotted key")
    try:
        value = _yaml(raw) if raw else ""
        check_structure(value)
    except yaml.YAMLError:
        value = raw
    except ConfigError as err:
        raise ConfigError(f"{key}: {err}") from None
    return key.split("."), value


# Config path of a plugin -> {kind: the names of its parameters} (engine/resolve.py CATALOG):
# lets an override that switches a plugin's kind keep what was written for the old one.
Catalog = Mapping[str, Mapping[str, Collection[str]]]


def apply_override(raw: dict[str, Any], path: list[str], value: Any,
                   catalog: Catalog | None = None) -> None:
    """Set `path` in the raw config. When it switches a plugin's kind (`catalog` names its
    kinds' parameters), the parameters written for the old kind move under the old kind's
    name: `task.model.kind=cnn` on `{kind: mlp, hidden: [64]}` gives
    `{kind: cnn, mlp: {hidden: [64]}}`, kept for mlp, not given to cnn."""
    node = raw
    for i, part in enumerate(path[:-1]):
        if part not in node:  # a plugin value left at its default: start from that default
            node[part] = _mapping_default(path[: i + 1])
        child = node[part]
        if not isinstance(child, dict):
            where = ".".join(path[: i + 1])
            raise ConfigError(f"{where}: is a value, not a section; cannot set {'.'.join(path)}")
        node = child
    section = ".".join(path[:-1])
    if catalog is not None and section in catalog:
        _switch_kind(node, section, path[-1], value, catalog[section])
    node[path[-1]] = value


def _mapping_default(path: list[str]) -> dict[str, Any]:
    """The schema's default at `path` when it is a mapping (a plugin named by a mapping,
    e.g. devices.up_bps = {kind: constant, value: 1.25e6}), else {}."""
    cls: Any = ExperimentConfig
    for part in path:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return {}
        default = field.get_default(call_default_factory=True)
        cls = field.annotation if isinstance(field.annotation, type) else None
    return copy.deepcopy(default) if isinstance(default, dict) else {}


def _switch_kind(node: dict[str, Any], section: str, key: str, new: Any,
                 kinds: Mapping[str, Collection[str]]) -> None:
    cls = PLUGIN_SECTIONS.get(section)
    kind_key = cls.KIND_KEY if cls else "kind"
    old = node.get(kind_key, cls.model_fields[kind_key].default if cls else None)
    if key != kind_key or not isinstance(old, str) or old == new or old not in kinds:
        return
    moving = [k for k in node if k in kinds[old] and k != kind_key]
    if moving:
        kept = node.get(old) if isinstance(node.get(old), dict) else {}
        node[old] = {**kept, **{k: node.pop(k) for k in moving}}


def _error_line(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-"))
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        parent, _, _ = loc.rpartition(".")
        return f"{loc}: unknown key{f' in {parent}' if parent else ''}"
    got = first.get("input")
    echo = "" if isinstance(got, dict) or first["type"] == "missing" else f" (got {shown(got)})"
    return f"{loc or 'config'}: {msg}{echo}"


def build_config(raw: dict[str, Any]) -> ExperimentConfig:
    check_structure(raw)
    check_numbers(raw)
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_error_line(err)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; any problem is one ConfigError line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB; not a config")
    try:
        raw = _yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML") from None
    if raw is None:
        raise ConfigError(f"{path}: the file is empty (a config is a mapping of keys)")
    check_structure(raw, str(path))
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys")
    return raw


def load_config(path: str | Path, overrides: list[str] = (),
                catalog: Catalog | None = None) -> ExperimentConfig:
    """Read a YAML scenario, apply `key=value` overrides, validate the schema (the plugins'
    parameters are checked when engine/resolve.py builds them)."""
    raw = read_yaml(path)
    for text in overrides:
        apply_override(raw, *parse_override(text), catalog)
    return build_config(raw)

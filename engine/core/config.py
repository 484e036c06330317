"""Scenario configs: YAML + dotted overrides -> typed, validated, frozen objects.

This is the config boundary: raw dicts and strings stop here. Every error becomes a
``ConfigError`` whose message is one line naming the offending key and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    model_validator,
    validate_call,
)

from engine.core.errors import SHOWN_CHARS, ConfigError, shown

MAX_CONFIG_BYTES = 1 << 20  # config and sweep files over 1 MiB are refused before parsing
MAX_OVERRIDE_CHARS = 1 << 16  # a `key=value` argument over 64 KiB is refused before parsing
MAX_DEPTH = 32  # YAML nesting deeper than this is refused while composing
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


class SyntheticConfig(_Strict):
    """LEAF's Synthetic(alpha, beta): each client has its own softmax model and input law."""

    alpha: float = Field(1.0, ge=0, description="spread of the clients' models")
    beta: float = Field(1.0, ge=0, description="spread of the clients' input means")
    num_features: int = Field(60, ge=1)
    num_classes: int = Field(10, ge=2)
    samples_per_client: int = Field(64, ge=2, description="mean samples per client (train+test)")
    quantity_sigma: float = Field(0.0, ge=0, description="lognormal spread of per-client counts")


class SupermaskConfig(_Strict):
    """A supermask model (scenarios/supermask.py): fixed random weights, one trained score per
    weight, and each layer uses only its top `keep` fraction of edges (FRL's k)."""

    keep: float = Field(0.5, gt=0, le=1, description="fraction of each layer's edges kept")
    by_magnitude: bool = Field(True, description="rank edges by |score| (FRL's code), "
                                                 "else by the signed score (FRL's paper text)")


class ModelConfig(_Strict):
    kind: Literal["logistic", "mlp", "cnn"] = "mlp"
    hidden: list[Annotated[int, Field(ge=1)]] = [64]
    supermask: SupermaskConfig | None = None  # None: a dense model whose weights train


class TaskConfig(_Strict):
    dataset: Literal["synthetic", "digits"] = "digits"
    synthetic: SyntheticConfig = SyntheticConfig()
    model: ModelConfig = ModelConfig()
    test_fraction: float = Field(0.2, gt=0, lt=1)
    max_test_samples: int = Field(10_000, ge=1)


class PartitionConfig(_Strict):
    """How training samples are split over clients (see scenarios/partition.py)."""

    kind: Literal["natural", "iid", "dirichlet", "shards", "quantity"] = "iid"
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (dirichlet, quantity)")
    shards_per_client: int = Field(2, ge=1)


class ParticipationConfig(_Strict):
    """Uniform participation: exactly one of clients_per_round (K of N) or fraction."""

    clients_per_round: int | None = Field(None, ge=1)
    fraction: float | None = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> ParticipationConfig:
        if (self.clients_per_round is None) == (self.fraction is None):
            raise ValueError("set exactly one of clients_per_round or fraction")
        return self


class PopulationConfig(_Strict):
    num_clients: int = Field(100, ge=1)
    participation: ParticipationConfig = ParticipationConfig(fraction=0.1)
    availability: AvailabilityConfig = Field(default_factory=lambda: AvailabilityConfig())

    @model_validator(mode="after")
    def _k_fits(self) -> PopulationConfig:
        k = self.participation.clients_per_round
        if k is not None and k > self.num_clients:
            raise ValueError(
                f"participation.clients_per_round={k} exceeds num_clients={self.num_clients}"
            )
        return self


class CompressionConfig(_Strict):
    """Client-side update compression (policies/compression.py): `kind` (none, topk, randomk,
    quantize8, qsgd, sign) with its parameters as the other keys (e.g. ratio, levels), and
    error feedback (a residual per client, kept in the pools)."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    kind: str = "none"
    error_feedback: bool = True

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TrainingConfig(_Strict):
    executor: Literal["vmap", "loop"] = "vmap"
    local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1, description="local Polyak momentum (EMA form)")
    prox_mu: float = Field(0.0, ge=0, description="FedProx proximal weight mu (0: plain SGD)")
    max_local_steps: int | None = Field(None, ge=1, description="local-step budget")
    min_local_steps: int | None = Field(None, ge=1, description="with max: budget drawn per "
                                        "client and round in [min, max]")
    scaffold: bool = Field(False, description="SCAFFOLD control variates (federated runs)")
    compression: CompressionConfig = CompressionConfig()

    @model_validator(mode="after")
    def _budget(self) -> TrainingConfig:
        low, high = self.min_local_steps, self.max_local_steps
        if low is not None and (high is None or low > high):
            raise ValueError(f"min_local_steps={low} needs max_local_steps >= it (got {high})")
        return self


class DistributionConfig(_Strict):
    """A per-client quantity, drawn once per client from `kind` (scenarios/devices.py):
    constant `value`; uniform in [low, high]; lognormal with `median` and `sigma`; Pareto with
    minimum `scale` and tail index `shape`; or `tiers`: `values` with probabilities `weights`."""

    kind: Literal["constant", "uniform", "lognormal", "pareto", "tiers"] = "constant"
    value: float | None = Field(None, ge=0)
    low: float | None = Field(None, ge=0)
    high: float | None = Field(None, ge=0)
    median: float | None = Field(None, gt=0)
    sigma: float | None = Field(None, ge=0)
    scale: float | None = Field(None, gt=0)
    shape: float | None = Field(None, gt=0)
    values: list[float] | None = Field(None, min_length=1)
    weights: list[float] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _parameters(self) -> DistributionConfig:
        needs = {"constant": ["value"], "uniform": ["low", "high"],
                 "lognormal": ["median", "sigma"], "pareto": ["scale", "shape"],
                 "tiers": ["values"]}[self.kind]
        missing = [n for n in needs if getattr(self, n) is None]
        if missing:
            raise ValueError(f"kind={self.kind} needs {', '.join(missing)}")
        if self.kind == "uniform" and self.low > self.high:
            raise ValueError(f"low={self.low} must be <= high={self.high}")
        if self.weights is not None and len(self.weights) != len(self.values or []):
            raise ValueError("tiers: weights must have one entry per value")
        return self


def _constant(value: float) -> Any:
    return Field(default_factory=lambda: DistributionConfig(value=value))


class AvailabilityConfig(_Strict):
    """Who is online in each slot (a round; `slot_s` virtual seconds in asynchronous runs),
    scenarios/availability.py. The server never sees the rates."""

    kind: Literal["always", "bernoulli", "cyclic", "markov", "trace", "anarchic"] = "always"
    probability: DistributionConfig = _constant(0.5)  # bernoulli, anarchic: p_i per client
    period: int = Field(24, ge=1, description="cyclic: slots per cycle")
    online_fraction: float = Field(0.5, gt=0, le=1, description="cyclic: share of a cycle on")
    p_on_off: float = Field(0.1, ge=0, le=1, description="markov: P(on -> off) per slot")
    p_off_on: float = Field(0.1, ge=0, le=1, description="markov: P(off -> on) per slot")
    path: str | None = Field(None, description="trace: Parquet/CSV of client_id, start, end")
    steps: DistributionConfig = _constant(1)  # anarchic: each client's own local steps
    slot_s: float = Field(1.0, gt=0, description="virtual seconds per slot (async runs)")


class SelectionConfig(_Strict):
    """Whom the server picks among the available clients (policies/selection.py) and how long
    a synchronous round waits for them."""

    kind: Literal["uniform", "over_selection", "power_of_choice"] = "uniform"
    factor: float = Field(1.3, ge=1, description="over_selection: pick factor*K, keep first K")
    candidates: int | None = Field(None, ge=1, description="power_of_choice: d (default 2K)")
    deadline_s: float | None = Field(None, gt=0, description="later arrivals are stragglers")


class DevicesConfig(_Strict):
    """Per-client compute and network, drawn once (scenarios/devices.py). A client's task time
    is latency + model bytes / down_bps + steps * step_s + update bytes / up_bps."""

    step_s: DistributionConfig = _constant(0.01)
    up_bps: DistributionConfig = _constant(1.25e6)
    down_bps: DistributionConfig = _constant(5e6)
    latency_s: DistributionConfig = _constant(0.05)
    path: str | None = Field(None, description="Parquet/CSV: client_id, step_s, up_bps, "
                                                "down_bps, latency_s (overrides the draws)")


class CrashConfig(_Strict):
    rate: float = Field(0.0, ge=0, le=1, description="P(an up client crashes) per slot")
    downtime: DistributionConfig | None = None  # slots down; None: crash-stop


class ChurnConfig(_Strict):
    """At slot `at`, a `leave` share of the present clients leaves for good and a `join`
    share of the absent ones joins."""

    at: int = Field(ge=0)
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


class StalenessConfig(_Strict):
    """FedAsync's s(tau) (Xie et al., 2019): constant 1; polynomial (1 + tau)^-a; hinge 1
    for tau <= b, else 1 / (a (tau - b) + 1)."""

    kind: Literal["constant", "polynomial", "hinge"] = "constant"
    a: float = Field(0.5, ge=0)
    b: float = Field(4.0, ge=0)


class ServerConfig(_Strict):
    """How the server runs rounds: synchronously, or asynchronously in virtual time
    (engine/loops/async_fl.py: FedAsync, FedBuff, FedFix, and semi-asynchronous FedCompass)."""

    mode: Literal["sync", "fedasync", "fedbuff", "fedfix", "fedcompass"] = "sync"
    concurrency: int = Field(10, ge=1, description="async: clients training at once "
                             "(fedcompass: also those waiting for their group)")
    buffer: int = Field(10, ge=1, description="fedbuff: aggregate every B arrivals")
    interval_s: float = Field(1.0, gt=0, description="fedfix: aggregate every interval")
    alpha: float = Field(0.6, gt=0, le=1, description="fedasync: mixing weight; fedcompass: "
                         "server step, x += alpha * sum_i s(tau_i) n_i / n * delta_i")
    staleness: StalenessConfig = StalenessConfig()
    lr: float = Field(1.0, gt=0, description="fedbuff, fedfix: server learning rate")
    dp_delta: float = Field(1e-5, gt=0, lt=1, description="delta of the (epsilon, delta) "
                            "reported per round with aggregation dp_gaussian")
    max_local_steps: int = Field(20, ge=1, description="fedcompass: Q_max, the most local steps "
                                 "the scheduler assigns (needs training.local_epochs enough "
                                 "batches on every client)")
    q_ratio: float = Field(0.2, gt=0, le=1, description="fedcompass: Q_min = max(1, "
                           "floor(q_ratio * Q_max)), the fewest local steps it assigns")
    tolerance: float = Field(1.5, ge=1, description="fedcompass: lambda, a group opened at t "
                             "for Q steps of speed v waits until t + lambda * Q * v")


class AttackConfig(_Strict):
    """Byzantine clients: `fraction` of the population, chosen by the seed tree, run attack
    `kind` (scenarios/adversaries.py); any other key is a parameter of that attack."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    kind: str = "none"
    fraction: float = Field(0.0, ge=0, le=1)

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class OutageConfig(_Strict):
    """A scheduled failure window [start, stop) of rounds: drop a seeded `fraction` of the
    edges, and/or cut the peers into `parts` contiguous id blocks (a network partition)."""

    start: int = Field(ge=0)
    stop: int = Field(ge=1)
    fraction: float = Field(0.0, ge=0, le=1)
    parts: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _window(self) -> OutageConfig:
        if self.stop <= self.start:
            raise ValueError(f"stop={self.stop} must be > start={self.start}")
        return self


TOPOLOGY_KINDS = ("ring", "torus", "grid", "complete", "star", "random_regular",
                  "erdos_renyi", "small_world", "barabasi_albert", "exponential", "hypercube",
                  "edge_list")


class TopologyConfig(_Strict):
    """The peers' communication graph (scenarios/topology.py)."""

    kind: Literal[TOPOLOGY_KINDS] = "ring"  # type: ignore[valid-type]
    degree: int = Field(4, ge=1, description="random_regular")
    p: float = Field(0.1, gt=0, le=1, description="erdos_renyi edge probability")
    k: int = Field(4, ge=2, description="small_world: nearest neighbours in the lattice")
    beta: float = Field(0.1, ge=0, le=1, description="small_world: rewiring probability")
    m: int = Field(2, ge=1, description="barabasi_albert: edges per new node")
    path: str | None = Field(None, description="edge_list: file of 'src dst' lines")
    directed: bool = Field(False, description="edge_list: arcs are directed")
    dynamic: Literal["static", "random_regular", "matching"] = "static"
    allow_disconnected: bool = False
    outages: list[OutageConfig] = []


class AsyncGossipConfig(_Strict):
    """Poisson clocks in virtual time (DADAO's model): each edge fires pairwise gossip at
    `edge_rate`, each peer takes a local SGD step at `step_rate` (events per unit time)."""

    edge_rate: float = Field(1.0, gt=0)
    step_rate: float = Field(1.0, gt=0)


class GossipConfig(_Strict):
    """Decentralized learning: how peers mix, how often, and how they are evaluated."""

    mode: Literal["sync", "async"] = "sync"
    mixing: Literal["metropolis_hastings", "max_degree", "push_sum"] = "metropolis_hastings"
    steps: int = Field(1, ge=1, description="gossip steps per round (multiple gossip steps)")
    init: Literal["shared", "independent"] = "shared"
    final_merge: bool = False
    eval_peers: int = Field(32, ge=0, description="peers evaluated per eval round; 0: all")
    peer_test_samples: int = Field(500, ge=1)
    asynchronous: AsyncGossipConfig = AsyncGossipConfig()


class StageSpec(_Strict):
    """One stage of an aggregation chain: a registry name (or "pkg.mod:attr") and its kwargs."""

    name: str = Field(min_length=1)
    kwargs: dict[str, Any] = Field(default_factory=dict)


def _stage_list(value: Any) -> Any:
    """Accept `name`, `{name: {kw: v}}` or a list of those; return a list of StageSpec dicts."""
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, str):
            out.append({"name": item})
        elif isinstance(item, dict) and len(item) == 1:
            (name, kwargs), = item.items()
            out.append({"name": name, "kwargs": {} if kwargs is None else kwargs})
        else:
            raise ValueError("a stage is a name or a one-key mapping {name: {param: value}}")
    return out


def _stage_field(default: str) -> Any:
    return Field(default_factory=lambda: [StageSpec(name=default)])


Stages = Annotated[list[StageSpec], BeforeValidator(_stage_list)]


class ExperimentConfig(_Strict):
    experiment: str = Field("default", pattern=EXPERIMENT_NAME, max_length=100,
                            description="one safe path component: the log folder's name")
    mode: Literal["federated", "decentralized"] = "federated"
    seed: int = Field(0, ge=0, le=2**63 - 1)
    rounds: int = Field(20, ge=1, le=10**8)
    eval_every: int = Field(5, ge=0, le=10**8,
                            description="rounds between evaluations; 0: last round only")
    task: TaskConfig = TaskConfig()
    partition: PartitionConfig = PartitionConfig()
    population: PopulationConfig = PopulationConfig()
    training: TrainingConfig = TrainingConfig()
    attack: AttackConfig = AttackConfig()
    selection: SelectionConfig = SelectionConfig()
    devices: DevicesConfig = DevicesConfig()
    failures: FailuresConfig = FailuresConfig()
    server: ServerConfig = ServerConfig()
    aggregation: Stages = _stage_field("fedavg")  # federated mode
    topology: TopologyConfig = TopologyConfig()  # decentralized mode
    gossip: GossipConfig = GossipConfig()  # decentralized mode
    consensus: Stages = _stage_field("gossip")  # decentralized mode: exactly one policy

    @field_serializer("aggregation", "consensus")
    def _stages_as_written(self, stages: list[StageSpec]) -> list[dict[str, Any]]:
        return [{s.name: dict(s.kwargs)} for s in stages]

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def digest(self) -> str:
        """A stable hash of the resolved config (what defines the results, not the runtime)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def call_validated(factory: Any, kwargs: dict[str, Any], where: str) -> Any:
    """factory(**kwargs) with kwargs checked against its annotations; a bad one is a
    ConfigError naming `where.<param>`."""
    try:
        return validate_call(factory)(**kwargs)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        msg = "unknown parameter" if "unexpected" in first["type"] else first["msg"]
        raise ConfigError(f"{where}.{key}: {msg} (got {shown(first.get('input'))})") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], value parsed as YAML: 5000 -> int, 0.1 -> float)."""
    if len(text) > MAX_OVERRIDE_CHARS:
        raise ConfigError(f"override {shown(text)}: longer than {MAX_OVERRIDE_CHARS} characters")
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {shown(text)}: expected key=value with a dotted key")
    try:
        value = _yaml(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    except ConfigError as err:
        raise ConfigError(f"{key}: {err}") from None
    return key.split("."), value


def apply_override(raw: dict[str, Any], path: list[str], value: Any) -> None:
    node = raw
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(path[: i + 1])
            raise ConfigError(f"{where}: is a value, not a section; cannot set {'.'.join(path)}")
        node = child
    node[path[-1]] = value


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
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys")
    return raw


def load_config(path: str | Path, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML scenario, apply `key=value` overrides, validate."""
    raw = read_yaml(path)
    for text in overrides:
        apply_override(raw, *parse_override(text))
    return build_config(raw)

"""The compatibility matrix, generated from the code: every protocol against every registered
plugin and world model.

A cell sets one plugin (a row) on one protocol (a column) over a tiny task, and is checked the
way a run is: the config is built and the engine prepares the run (engine/experiment.py
`prepare`), so a cell is refused exactly when a run would be, with the engine's own one-line
reason. A cell is not applicable when the row's kind has no part in the protocol (a server's
aggregation in gossip, a graph topology in federated learning). The rows come from the
registries, so a new plugin has its cells the day it is registered.

`python run.py plugins` prints it; docs/COMPATIBILITY.md is `render(matrix())`, and a test
keeps the two equal and runs every allowed cell (tests/test_compatibility.py).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.compute.training import EXECUTORS
from engine.core.config import ServerConfig, build_config
from engine.core.errors import ConfigError
from engine.experiment import prepare
from engine.protocols import in_matrix
from engine.protocols.base import ProtocolSpec, part_of
from engine.resolve import resolve
from policies.asynchronous import SERVER_RULES
from policies.compression import COMPRESSORS
from policies.registry import AGGREGATION, CONSENSUS
from policies.selection import SELECTION
from policies.staleness import STALENESS
from scenarios.adversaries import ATTACKS
from scenarios.availability import AVAILABILITY
from scenarios.datasets import DATASETS
from scenarios.mixing import MIXING
from scenarios.models import MODELS
from scenarios.partition import PARTITIONS
from scenarios.platforms import PLATFORMS
from scenarios.topology import TOPOLOGIES
from scenarios.user_data import write_examples

# The tiny task every cell runs on: 8 clients (peers) of digits, a logistic model, 2 rounds.
TINY: dict[str, Any] = {
    "experiment": "matrix", "seed": 0, "rounds": 2, "eval_every": 0,
    "task": {"dataset": "digits", "model": {"kind": "logistic"}},
    "partition": {"kind": "iid"},
    "population": {"num_clients": 8},
    "training": {"executor": "vmap", "local_epochs": 1, "batch_size": 64},  # lr: the default
}
PROTOCOLS: list[ProtocolSpec] = in_matrix()  # the columns, from the protocol registry
NAMES = tuple(p.label for p in PROTOCOLS)


@dataclass(frozen=True)
class Row:
    kind: str
    name: str
    sections: dict[str, Any]  # set over the protocol's config ("{files}": a folder of inputs)
    group: str = ""  # packing: rows of one group never share a run (see covering_runs)

    def parts(self) -> set[str]:
        """The parts (engine/protocols/base.py PARTS) the row's settings belong to."""
        return {part for path in _leaves(self.sections) if (part := part_of(path))}

    def applies(self, protocol: ProtocolSpec) -> bool:
        """Whether the protocol has the row's parts, as it declares them: every part it
        consumes, a parameter its server rule takes, an attack made for its family."""
        if not all(protocol.uses(part) for part in self.parts()):
            return False
        if self.kind == "attack":
            attack = ATTACKS.make(self.name)
            return attack.for_servers if protocol.federated else attack.for_peers
        rule = (protocol.example or {}).get("server", {}).get("mode")
        taken = SERVER_RULES.parameters(SERVER_RULES[rule]) if rule else {}
        fields = ServerConfig.model_fields
        return all(path.split(".")[1] in taken or path.split(".")[1] in fields
                   for path in _leaves(self.sections) if path.startswith("server."))


@dataclass(frozen=True)
class Cell:
    status: str  # "ok", "reduces" (runs as another rule would: `reason` names it), "refused"
    # or "n/a"
    reason: str = ""


# Parameters a plugin needs on the tiny task (beyond its defaults), by (kind, name).
PARAMS: dict[tuple[str, str], dict[str, Any]] = {
    ("aggregation", "dp_gaussian"): {"clip": 1.0, "noise_multiplier": 0.5},
    ("aggregation", "krum"): {"f": 1}, ("aggregation", "multi_krum"): {"f": 1},
    ("aggregation", "bulyan"): {"f": 0},
    ("availability", "trace"): {"path": "{files}/trace.csv"},
    ("availability", "bernoulli"): {"probability": {"kind": "constant", "value": 0.7}},
    ("topology", "random_regular"): {"degree": 3},
    ("topology", "erdos_renyi"): {"p": 0.6},
    ("topology", "small_world"): {"k": 4, "beta": 0.2},
    ("topology", "barabasi_albert"): {"m": 2},
    ("topology", "edge_list"): {"path": "{files}/edges.txt"},
}
# Other sections a plugin needs set with it (a directed graph gossips by push-sum, ...).
WITH: dict[tuple[str, str], dict[str, Any]] = {
    ("aggregation", "frl"): {"task": {"model": {"supermask": {"keep": 0.5}}}},
    ("aggregation", "greedy_soup"): {"task": {"validation_fraction": 0.2}},
    ("topology", "exponential"): {"consensus": "push_sum", "gossip": {"mixing": "push_sum"}},
    ("topology", "random_matching"): {"topology": {"dynamic": "redraw",
                                                   "allow_disconnected": True}},
    ("mixing", "push_sum"): {"consensus": "push_sum"},
    ("consensus", "push_sum"): {"gossip": {"mixing": "push_sum"}},
    ("partition", "natural"): {"task": {"dataset": "synthetic"}},
    ("dataset", "synthetic"): {"partition": {"kind": "natural"}},
    ("dataset", "parquet"): {"task": {"parquet": {"path": "{files}/clients.parquet"}},
                             "partition": {"kind": "natural"}},
    ("dataset", "leaf"): {"task": {"leaf": {"path": "{files}/leaf.json"}},
                          "partition": {"kind": "natural"}},
    # environments: short rollouts and few test episodes (the matrix runs every cell)
    ("dataset", "cartpole"): {"task": {"cartpole": {"rollout_steps": 32, "test_envs": 2}}},
    ("dataset", "pendulum"): {"task": {"pendulum": {"rollout_steps": 32, "test_envs": 2}}},
}


def _plugin(kind: str, name: str) -> Any:
    params = PARAMS.get((kind, name))
    return {name: params} if params else name


def _stage_value(name: str) -> Any:
    """A stage as a whole chain: a transform before, an optimizer after a weighted mean."""
    role = AGGREGATION[name].stage_kind
    stage = _plugin("aggregation", name)
    return {"transform": [stage, "weighted_mean"],
            "optimizer": ["weighted_mean", stage]}.get(role, stage)


def _rows_of(kind: str, names: Iterable[str], path: Callable[[Any], dict],
             group: str = "") -> list[Row]:
    return [Row(kind, name, _merged(path(_plugin(kind, name)), WITH.get((kind, name), {})),
                group or kind)
            for name in names]


WORLD: list[tuple[str, dict[str, Any]]] = [
    ("crash-stop", {"failures": {"crash": {"rate": 0.2}}}),
    ("crash-recover", {"failures": {"crash": {"rate": 0.3, "downtime": {
        "kind": "constant", "value": 2}}}}),
    ("churn", {"failures": {"absent_at_start": 0.25, "churn": [
        {"at": 1, "leave": 0.2, "join": 0.5}]}}),
    ("dropouts", {"failures": {"dropout_before": 0.2, "dropout_after": 0.2}}),
    ("message loss", {"failures": {"message_loss": 0.2}}),
    ("link failure", {"failures": {"link_failure": 0.2}}),
    ("outage", {"topology": {"outages": [{"start": 0, "stop": 1, "fraction": 0.5}]}}),
    ("devices", {"devices": {"step_s": {"kind": "lognormal", "median": 0.01, "sigma": 1.0},
                             "up_bps": {"kind": "tiers", "values": [1e5, 1e6]}}}),
    ("devices file", {"devices": {"path": "{files}/devices.csv"}}),
    ("deadline", {"selection": {"deadline_s": 0.05}}),
]
TRAINING: list[tuple[str, dict[str, Any]]] = [
    ("scaffold", {"training": {"scaffold": True}}),
    ("fedprox", {"training": {"prox_mu": 0.01}}),
    ("momentum", {"training": {"momentum": 0.9}}),
    ("streaming diloco", {"training": {"streaming": {"fragments": 2, "tau": 1,
                                                     "alpha": 0.5}}}),
    ("sam", {"training": {"sam_rho": 0.05}}),
    ("step budget", {"training": {"max_local_steps": 2, "min_local_steps": 1}}),
    ("error feedback off", {"training": {"compression": {"kind": "topk",
                                                         "error_feedback": False}}}),
    ("scallion", {"training": {"scaffold": True, "compression": {
        "kind": "qsgd", "controlled": "scallion"}}}),
    ("scafcom", {"training": {"scaffold": True, "compression": {
        "kind": "topk", "controlled": "scafcom", "beta": 0.5}}}),
    ("final merge", {"gossip": {"final_merge": True}}),
    ("independent init", {"gossip": {"init": "independent"}}),
]


def rows() -> list[Row]:
    """Every row, registries first (in their registration order), then the world models and
    the training variants."""
    stages = AGGREGATION.names()
    out = [*(Row("aggregation", name, _merged({"aggregation": _stage_value(name)},
                                              WITH.get(("aggregation", name), {})),
                 f"aggregation.{AGGREGATION[name].stage_kind}")
             for name in stages)]
    out += _rows_of("consensus", [n for n in CONSENSUS.names() if n != "modest"],
                    lambda v: {"consensus": v})
    out += _rows_of("attack", [n for n in ATTACKS.names() if n != "none"],
                    lambda v: {"attack": _kind(v, fraction=0.25)})
    out += _rows_of("selection", SELECTION.names(), lambda v: {"selection": _kind(v)})
    out += _rows_of("staleness", STALENESS.names(),
                    lambda v: {"server": {"staleness": _kind(v)}})
    out += _rows_of("compression", [n for n in COMPRESSORS.names() if n != "none"],
                    lambda v: {"training": {"compression": _kind(v)}})
    out += _rows_of("platform", [n for n in PLATFORMS.names() if n != "none"],
                    lambda v: {"server": {"platform": _kind(v)}})
    out += _rows_of("availability", [n for n in AVAILABILITY.names() if n != "always"],
                    lambda v: {"population": {"availability": _kind(v)}})
    out += _rows_of("topology", TOPOLOGIES.names(), lambda v: {"topology": _kind(v)})
    out += _rows_of("mixing", MIXING.names(), lambda v: {"gossip": {"mixing": _name(v)}})
    out += _rows_of("partition", PARTITIONS.names(), lambda v: {"partition": _kind(v)})
    out += _rows_of("dataset", DATASETS.names(), lambda v: {"task": {"dataset": _name(v)}})
    out += _rows_of("model", MODELS.names(), lambda v: {"task": {"model": _kind(v)}})
    out += _rows_of("executor", EXECUTORS.names(),
                    lambda v: {"training": {"executor": _name(v)}})
    out += [Row("world", name, sections, "world") for name, sections in WORLD]
    out += [Row("training", name, sections, "training") for name, sections in TRAINING]
    return out


def _kind(value: Any, **extra: Any) -> dict[str, Any]:
    """A plugin value as {kind: name, params...}."""
    if isinstance(value, str):
        return {"kind": value, **extra}
    (name, params), = value.items()
    return {"kind": name, **params, **extra}


def _name(value: Any) -> str:
    return value if isinstance(value, str) else next(iter(value))


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `base`, mapping by mapping (a list or a value replaces)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _filled(value: Any, files: Path) -> Any:
    if isinstance(value, str):
        return value.replace("{files}", str(files))
    if isinstance(value, dict):
        return {k: _filled(v, files) for k, v in value.items()}
    if isinstance(value, list):
        return [_filled(v, files) for v in value]
    return value


def write_inputs(files: Path) -> Path:
    """The small input files some rows read (an availability trace, an edge list, device
    profiles, the file datasets' clients), for the 8 clients of TINY."""
    files.mkdir(parents=True, exist_ok=True)
    n = TINY["population"]["num_clients"]
    (files / "trace.csv").write_text("client_id,start,end\n" + "".join(
        f"{c},{c % 2},{c % 2 + 3}\n" for c in range(n)))
    (files / "edges.txt").write_text("".join(f"{c} {(c + 1) % n}\n{c} {(c + 3) % n}\n"
                                             for c in range(n)))
    write_examples(files, n)
    (files / "devices.csv").write_text("client_id,step_s,up_bps,down_bps,latency_s\n" + "".join(
        f"{c},{0.001 * (c + 1)},{1e6},{5e6},{0.01}\n" for c in range(n)))
    return files


def config_of(protocol: ProtocolSpec, row_sections: Iterable[dict[str, Any]], files: Path):
    """The cell's (or a covering run's) config: TINY, the protocol's example, then each row's
    sections."""
    raw = _merged(TINY, dict(protocol.example))
    for sections in row_sections:
        raw = _merged(raw, sections)
    return build_config(_filled(raw, files))


def refusal(protocol: ProtocolSpec, row_sections: Iterable[dict[str, Any]],
            files: Path) -> str | None:
    """The engine's one-line reason for refusing this config, or None if it runs."""
    cell = check(protocol, row_sections, files)
    return cell.reason if cell.status == "refused" else None


def check(protocol: ProtocolSpec, row_sections: Iterable[dict[str, Any]], files: Path) -> Cell:
    """The cell as the engine sees it: refused (its one-line reason), a run of another
    protocol (n/a: the row changes which protocol the keys select), a run that reduces to
    another rule (the note the engine shows), or a run."""
    try:
        cfg = config_of(protocol, row_sections, files)
        if resolve(cfg).protocol.name != protocol.name:
            return Cell("n/a")
        notes = prepare(cfg).mode.notes
    except ConfigError as err:
        return Cell("refused", str(err))
    return Cell("reduces", _reduced_to(notes[0])) if notes else Cell("ok")


def _reduced_to(note: str) -> str:
    """The rule a note says the run reduces to ("... gives aggregation=X's results")."""
    return note.rsplit("aggregation=", 1)[-1].split("'s results")[0]


@dataclass
class Matrix:
    rows: list[Row]
    cells: dict[tuple[str, str, str], Cell] = field(default_factory=dict)  # (kind, name, p)

    def cell(self, row: Row, protocol: str) -> Cell:
        return self.cells[row.kind, row.name, protocol]

    def allowed(self, protocol: str) -> list[Row]:
        return [r for r in self.rows if self.cell(r, protocol).status in ("ok", "reduces")]

    def counts(self) -> tuple[int, int, int]:
        """(allowed, refused, not applicable) cells; allowed ones include reductions."""
        statuses = [c.status for c in self.cells.values()]
        return (statuses.count("ok") + statuses.count("reduces"), statuses.count("refused"),
                statuses.count("n/a"))

    def reductions(self) -> int:
        return sum(c.status == "reduces" for c in self.cells.values())


def matrix(files: Path | None = None) -> Matrix:
    """Every cell's status, checked by preparing its run."""
    with tempfile.TemporaryDirectory() as tmp:
        files = write_inputs(Path(files or tmp))
        m = Matrix(rows())
        for row in m.rows:
            for p in PROTOCOLS:
                m.cells[row.kind, row.name, p.label] = (
                    check(p, [row.sections], files) if row.applies(p) else Cell("n/a"))
        return m


def covering_runs(m: Matrix, protocol: str) -> list[list[Row]]:
    """The protocol's allowed rows packed into few runs: run i takes the i-th allowed row of
    every group (at most one stage of each role, one topology, ...), so every allowed cell
    runs once. A run whose combination is refused (two rows that exclude each other, or set
    the same key) is split back into its rows, one run each."""
    groups: dict[str, list[Row]] = {}
    for row in m.allowed(protocol):
        groups.setdefault(row.group, []).append(row)
    width = max((len(g) for g in groups.values()), default=0)
    return [[g[i] for g in groups.values() if i < len(g)] for i in range(width)]


def combined_sections(run: list[Row]) -> list[dict[str, Any]] | None:
    """The runs' sections, with aggregation stages of different roles chained (transforms,
    then the reduction, then optimizers); None if two rows set one key differently."""
    stages = {role: [] for role in ("transform", "reduction", "optimizer")}
    others: list[dict[str, Any]] = []
    for row in run:
        if row.kind == "aggregation":
            role = AGGREGATION[row.name].stage_kind
            stages["reduction" if role == "aggregator" else role].append(
                _plugin("aggregation", row.name))
            others.append({k: v for k, v in row.sections.items() if k != "aggregation"})
        else:
            others.append(row.sections)
    if not _disjoint(others):
        return None
    chain = [*stages["transform"], *(stages["reduction"] or ["weighted_mean"]),
             *stages["optimizer"]]
    aggregation = [{"aggregation": chain[0] if len(chain) == 1 else chain}] \
        if any(stages.values()) else []
    return aggregation + others


def _disjoint(parts: list[dict[str, Any]]) -> bool:
    """No two parts set the same leaf key."""
    seen: set[str] = set()
    for part in parts:
        for key in _leaves(part):
            if key in seen:
                return False
            seen.add(key)
    return True


def _leaves(d: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in d.items():
        path = f"{prefix}{key}"
        out += _leaves(value, path + ".") if isinstance(value, dict) and value else [path]
    return out


# ------------------------------------------------------------------------------ rendering

MARK = {"ok": "✓", "n/a": "·"}


def render(m: Matrix) -> str:
    """docs/COMPATIBILITY.md: one table per kind, refusals numbered under it."""
    allowed, refused, na = m.counts()
    applicable = allowed + refused
    lines = [
        "# Compatibility matrix",
        "",
        "Generated from the code (engine/compatibility.py) by",
        "`python run.py plugins --write-matrix docs/COMPATIBILITY.md`; `python run.py plugins",
        "--matrix` prints it. The columns are the protocol registry's (engine/protocols), and a",
        "cell is not applicable exactly when the protocol does not declare the row's parts",
        "(such a setting is refused at load time). Every other cell is checked the way a run",
        "is: its config is built and the engine prepares the run, so a refusal is the engine's",
        "own one-line reason. A test keeps this file equal to what the code generates, and runs",
        "every allowed cell for two rounds on a tiny task (8 clients of digits, a logistic",
        "model), inline, and a sample of them on Ray with 2 pools.",
        "",
        "✓ runs · ≡ X runs, and gives the results of X (the engine says so at start: e.g. a",
        "robust rule over FedAsync's single update) · ✗n refused (reason n below the table) ·",
        "`·` not applicable (the protocol has no such part: a server's aggregation in gossip, a",
        "graph in federated learning).",
        "",
        f"**{applicable} applicable cells: {allowed} run ({m.reductions()} of them reduce to "
        f"another rule), {refused} refused ({100 * refused / max(applicable, 1):.1f}%); {na} "
        "not applicable.**",
        "",
    ]
    reasons: list[str] = []
    kinds: dict[str, list[Row]] = {}
    for row in m.rows:
        kinds.setdefault(row.kind, []).append(row)
    for kind, kind_rows in kinds.items():
        lines += [f"## {kind}", "", "| | " + " | ".join(NAMES) + " |",
                  "|---|" + "---|" * len(NAMES)]
        first = len(reasons)
        for row in kind_rows:
            marks = []
            for p in NAMES:
                cell = m.cell(row, p)
                if cell.status == "refused":
                    if cell.reason not in reasons:
                        reasons.append(cell.reason)
                    marks.append(f"✗{reasons.index(cell.reason) + 1}")
                elif cell.status == "reduces":
                    marks.append(f"≡ {cell.reason}")
                else:
                    marks.append(MARK[cell.status])
            lines.append(f"| `{row.name}` | " + " | ".join(marks) + " |")
        lines.append("")
        lines += [f"{i + 1}. {reasons[i]}" for i in range(first, len(reasons))]
        if len(reasons) > first:
            lines.append("")
    return "\n".join(lines)


def render_text(m: Matrix) -> str:
    """The matrix for a terminal: one line per row, one column per protocol."""
    width = max(len(f"{r.kind} {r.name}") for r in m.rows)
    short = [n.replace("sync ", "s-").replace("async ", "a-") for n in NAMES]
    cols = max(len(s) for s in short)
    lines = [" " * width + "  " + " ".join(s.rjust(cols) for s in short)]
    reasons: list[str] = []
    for row in m.rows:
        marks = []
        for p in NAMES:
            cell = m.cell(row, p)
            if cell.status == "refused":
                if cell.reason not in reasons:
                    reasons.append(cell.reason)
                marks.append(f"x{reasons.index(cell.reason) + 1}".rjust(cols))
            else:
                marks.append({"ok": "+", "reduces": "=", "n/a": "."}[cell.status].rjust(cols))
        lines.append(f"{row.kind} {row.name}".ljust(width) + "  " + " ".join(marks))
    allowed, refused, na = m.counts()
    lines += ["", f"+ runs, = runs and gives another rule's results, xN refused (reason N), "
              f". not applicable: {allowed} run ({m.reductions()} reduce), {refused} refused, "
              f"{na} not applicable", ""]
    lines += [f"{i + 1}. {r}" for i, r in enumerate(reasons)]
    return "\n".join(lines)

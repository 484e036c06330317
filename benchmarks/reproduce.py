"""The seed papers' claims, rerun: every entry of docs/REPRODUCTIONS.md.

Each entry is a shipped sweep (configs/papers/*.yaml) whose runs put the paper's method next
to its baseline, and the claim as a comparison of one summary metric (`analyze`'s columns,
averaged over seeds). The sweeps run exactly as a user runs them (`run.py sweep`, a real
subprocess), then the runs' Parquet logs are read back.

    python benchmarks/reproduce.py --quick           # every entry at reduced size (minutes)
    python benchmarks/reproduce.py --only flag,fedau # full size, as the docs' figures
    python benchmarks/reproduce.py --figures docs/figures   # and redraw each entry's figure

It prints one row per claim: the method's value, the baseline's, and whether the claim's
direction held. Exit status 0 whatever the outcomes (a claim that does not reproduce is a
finding, written up in docs/REPRODUCTIONS.md); 1 if a sweep failed to run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.analysis.summary import filter_runs, load_runs, metric_values, parse_filter  # noqa: E402
from engine.records.logs import read_table  # noqa: E402


class Check(NamedTuple):
    """The claim's direction: `metric` of the `method` runs is better (`higher`, `lower`, or
    `similar`: within 0.03) than that of the `baseline` runs. Each side is `key=value` filters
    of the sweep's runs joined by " & "; a metric is a summary column (`analyze`'s), or
    `mean:COLUMN` / `max:COLUMN` of a rounds column over each run's rounds."""

    metric: str
    better: str  # "higher" | "lower" | "similar"
    method: str
    baseline: str


class Entry(NamedTuple):
    name: str  # docs/figures/<name>/; the sweep is configs/papers/<file or name>.yaml
    paper: str
    claim: str
    checks: tuple[Check, ...]
    plot: str = "accuracy:round"  # analyze --plot (or "heatmap:K1,K2")
    group_by: str | None = None  # the plot's curves (default: every swept column)
    quick: tuple[str, ...] = ("rounds=20",)  # overrides for --quick
    target: float | None = None  # analyze --target, for rounds/vtime_to_target
    file: str | None = None

    @property
    def sweep(self) -> Path:
        return ROOT / "configs" / "papers" / f"{self.file or self.name}.yaml"


def _higher(metric: str, method: str, baseline: str) -> Check:
    return Check(metric, "higher", method, baseline)


def _lower(metric: str, method: str, baseline: str) -> Check:
    return Check(metric, "lower", method, baseline)


def _similar(metric: str, method: str, baseline: str) -> Check:
    return Check(metric, "similar", method, baseline)


SIMILAR = 0.03


ACC = "final_accuracy"
DADAO = "consensus={dadao: {mu: 0.01, L: 6.3}}"
LIFL, ALWAYS_ON = "platform=lifl", "platform=always_on"
SLOW, FAST = (f"bps={bps}" for bps in (2000000.0, 20000000.0))
ENTRIES: tuple[Entry, ...] = (
    Entry("flag", "Almasi et al., 2024, Flag Aggregator",
          "Flag significantly enhances robustness to Byzantine workers",
          (_higher(ACC, "aggregation=flag_aggregator", "aggregation=fedavg"),
           _higher(ACC, "aggregation=flag_aggregator", "aggregation=trimmed_mean"))),
    Entry("fedau", "Wang & Ji, 2024, FedAU",
          "FedAU beats FedAvg under unknown heterogeneous participation",
          (_higher(ACC, "aggregation=fedau", "aggregation=fedavg"),), quick=("rounds=40",)),
    Entry("fedfix", "Fraboni et al., 2023, A General Theory ... (FedFix)",
          "FedFix improves over synchronous and asynchronous FedAvg",
          (_lower("vtime_to_target", "server.mode=fedfix", "server.mode=sync"),
           _higher(ACC, "server.mode=fedfix", "server.mode=fedasync")),
          plot="accuracy:virtual_time", quick=(), target=0.85),
    Entry("fedcompass", "Li et al., 2024, FedCompass",
          "faster and more accurate than asynchronous FL, more efficient than synchronous FL",
          (_higher(ACC, "server.mode=fedcompass", "server.mode=fedasync"),
           _lower("vtime_to_target", "server.mode=fedcompass", "server.mode=sync")),
          plot="accuracy:virtual_time", quick=(), target=0.85),
    Entry("variance_corrected", "Tian et al., 2024, Vanishing Variance",
          "variance-corrected averaging speeds up gossip learning from uncorrelated models",
          (_higher(ACC, "consensus=variance_corrected", "consensus=gossip"),)),
    Entry("monna", "Farhadkhani et al., 2023, MoNNA",
          "momentum + nearest-neighbour averaging is robust where D-SGD is not",
          (_higher(ACC, "consensus=monna", "consensus=gossip"),)),
    Entry("frl", "Mozaffari et al., 2023, FRL",
          "voting on rankings is robust to poisoning",
          (_higher(ACC, "aggregation=frl", "aggregation=fedavg"),)),
    Entry("feddisco", "Ye et al., 2023, FedDisco",
          "discrepancy-aware weights beat dataset-size weights under label skew",
          (_higher(ACC, "aggregation=[feddisco, fedavg]", "aggregation=fedavg"),)),
    Entry("fisher", "Matena & Raffel, 2022, Fisher merging",
          "Fisher merging beats the plain parameter average",
          (_higher(ACC, "aggregation=fisher_merge", "aggregation=fedavg"),)),
    Entry("mwa", "Metrics-Weighted Averaging, 2025",
          "loss-weighted merging beats the uniform average",
          (_higher(ACC, "aggregation=[mwa, fedavg]", "aggregation=[uniform_weights, fedavg]"),)),
    Entry("modest", "de Vos et al., 2023, MoDeST",
          "3x-14x less communication than decentralized learning, converging as fast",
          (_lower("bytes", "consensus=modest", "consensus=gossip"),
           _higher(ACC, "consensus=modest", "consensus=gossip")),
          plot="accuracy:virtual_time"),
    Entry("single_merge", "A Single Merging Suffices, 2025",
          "one global merge at the end lets every peer hold the server-level model",
          (_higher("peer_acc_min", "gossip.final_merge=true", "gossip.final_merge=false"),),
          plot="peer_accuracy:round"),
    Entry("ranking", "Colombo et al., 2022, What are the best systems?",
          "rank aggregation (Borda, Kemeny) and the mean can crown different systems",
          (), plot="heatmap:attack.kind,aggregation", quick=("rounds=10",)),
    Entry("single_merging", "Zhu et al., 2025, A Single Merging Suffices (schedule)",
          "concentrating the communication budget late, then merging, improves generalization",
          (_higher(ACC, "gossip.schedule.kind=increasing", "gossip.schedule.kind=uniform"),
           _higher(ACC, "gossip.schedule.kind=late", "gossip.schedule.kind=uniform")),
          group_by="gossip.schedule.kind", quick=("rounds=20", "gossip.schedule.budget=10"),
          file="single_merging_sweep"),
    Entry("fortytwo", "Larin et al., 2025, Fortytwo",
          "peer-ranked, reputation-weighted consensus filters malicious participants",
          (_higher(ACC, "consensus=peer_ranked", "consensus=gossip"),),
          quick=("rounds=10",), file="fortytwo_sweep"),
    Entry("bristle", "Verbraeken, de Vos & Pouwelse, 2022, Bristle",
          "resilient to Byzantine peers under non-i.i.d. classes",
          (_higher(ACC, "consensus=bristle", "consensus=gossip"),),
          quick=("rounds=10",), file="bristle_sweep"),
    Entry("dfedsam", "Shi et al., 2023, DFedSAM",
          "SAM local steps improve decentralized FL; multiple gossip steps more so",
          (_higher(ACC, "training.sam_rho=0.05 & gossip.steps=1",
                   "training.sam_rho=0.0 & gossip.steps=1"),
           _higher(ACC, "training.sam_rho=0.05 & gossip.steps=4",
                   "training.sam_rho=0.0 & gossip.steps=4")),
          file="dfedsam_sweep"),
    Entry("scallion", "Huang, Li & Li, 2024, SCALLION",
          "controlled averaging with unbiased compression beats compressed FedAvg",
          (_higher(ACC, "method=scallion", "scaffold=false & compressor=qsgd"),),
          file="scallion_sweep"),
    Entry("scafcom", "Huang, Li & Li, 2024, SCAFCOM",
          "controlled averaging with biased compression beats compressed FedAvg",
          (_higher(ACC, "method=scafcom & beta=0.6", "scaffold=false"),),
          file="scafcom_sweep"),
    Entry("model_stock", "Jang, Yun & Han, 2024, Model Stock",
          "layer-wise interpolation towards the anchor beats the plain average",
          (_higher(ACC, "aggregation=model_stock", "aggregation=uniform_soup"),),
          file="model_stock_sweep"),
    Entry("model_soups", "Wortsman et al., 2022, Model soups",
          "the greedy soup beats the uniform soup",
          (_higher(ACC, "aggregation=greedy_soup", "aggregation=uniform_soup"),),
          file="model_soups_sweep"),
    Entry("afa", "Yang et al., 2022, Anarchic Federated Learning",
          "AFA-CD/AFA-CS converge under anarchic participation",
          (_higher(ACC, "aggregation={afa_cd: {lr: 10.0}}", "aggregation=fedavg"),
           _higher(ACC, "aggregation={afa_cs: {lr: 10.0}}", "aggregation=fedavg")),
          file="afa_sweep"),
    Entry("lifl", "Qi et al., 2024, LIFL",
          "hierarchical serverless aggregation is faster and uses fewer resources",
          (_lower("mean:aggregation_latency_s", f"{LIFL} & {SLOW}", f"{ALWAYS_ON} & {SLOW}"),
           _lower("mean:aggregator_s", f"{LIFL} & {SLOW}", f"{ALWAYS_ON} & {SLOW}"),
           _lower("mean:aggregator_s", f"{LIFL} & {FAST}", f"{ALWAYS_ON} & {FAST}")),
          plot="aggregation_latency_s:round", group_by="platform,bps", quick=("rounds=5",),
          file="lifl_sweep"),
    Entry("streaming_diloco", "Douillard et al., 2025, Streaming DiLoCo",
          "similar quality to DiLoCo with a much lower peak bandwidth",
          (_lower("max:bytes_communicated", "training.streaming={fragments: 4, tau: 1, "
                  "alpha: 0.5, bits: 4}", "training.streaming=null"),
           _similar(ACC, "training.streaming={fragments: 4, tau: 1, alpha: 0.5, bits: 4}",
                    "training.streaming=null")),
          plot="accuracy:virtual_time", group_by="aggregation", quick=(),
          file="streaming_diloco_sweep"),
    Entry("dadao", "Nabli & Oyallon, 2023, DADAO",
          "accelerated in computations and communications over asynchronous gossip",
          (_lower("consensus_dist", DADAO, "consensus=gossip"),
           _higher(ACC, DADAO, "consensus=gossip")),
          group_by="consensus", quick=("rounds=60", "eval_every=20"), file="dadao_sweep"),
)


class Outcome(NamedTuple):
    entry: str
    check: str
    method: float | None
    baseline: float | None
    held: bool | None


def run_sweep(entry: Entry, log_dir: Path, quick: bool, backend: str) -> float:
    cmd = [sys.executable, str(ROOT / "run.py"), "sweep", str(entry.sweep),
           *(entry.quick if quick else ()), "--log-dir", str(log_dir), "--no-progress",
           "--backend", backend]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{entry.name}: {' '.join(cmd)} exited {done.returncode}:\n"
                           f"{done.stderr[-2000:]}")
    return time.perf_counter() - start


def _experiment(entry: Entry) -> str:
    for line in entry.sweep.read_text().splitlines():
        if line.startswith("experiment:"):
            return line.partition(":")[2].strip()
    return entry.name


def sides(side: str) -> list:
    """`key=value & key=value` -> the filters."""
    return [parse_filter(part.strip()) for part in side.split(" & ")]


def _per_run(exp_dir: Path, metric: str, run_ids: list[str]) -> np.ndarray:
    """`mean:COLUMN` / `max:COLUMN` of the rounds table, one value per run."""
    how, _, column = metric.partition(":")
    rounds = read_table(exp_dir, "rounds")
    ids = np.array(rounds["run_id"].to_pylist())
    values = rounds[column].to_numpy(zero_copy_only=False).astype(float)
    out = []
    for run in run_ids:
        mine = values[(ids == run) & np.isfinite(values)]
        out.append(getattr(mine, how)() if mine.size else np.nan)
    return np.array(out)


def _mean(runs, exp_dir: Path, side: str, metric: str) -> float | None:
    chosen = filter_runs(runs, sides(side))
    if ":" in metric:
        values = _per_run(exp_dir, metric, chosen.summary["run_id"].to_pylist())
    else:
        values = metric_values(chosen.summary, metric)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


def judge(entry: Entry, exp_dir: Path) -> list[Outcome]:
    runs = load_runs(exp_dir, entry.target if entry.target is not None else 0.8)
    out = []
    for c in entry.checks:
        a, b = _mean(runs, exp_dir, c.method, c.metric), _mean(runs, exp_dir, c.baseline,
                                                               c.metric)
        held = None if a is None or b is None else {
            "higher": a > b, "lower": a < b, "similar": abs(a - b) <= SIMILAR}[c.better]
        sign = {"higher": ">", "lower": "<", "similar": "~"}[c.better]
        out.append(Outcome(entry.name, f"{c.metric}: {c.method} {sign} {c.baseline}", a, b,
                           held))
    if not entry.checks:  # the ranking entry: do the mean and rank aggregation disagree?
        from engine.analysis.ranking import rank_systems

        ranked = rank_systems(runs, "aggregation", "attack.kind", [ACC])
        top = {how: str(ranked.systems[int(np.argmin(order))]) for how, order in
               (("mean", ranked.by_mean), ("borda", ranked.by_borda),
                ("kemeny", ranked.by_kemeny))}
        differs = bool((ranked.by_mean != ranked.by_borda).any()
                       or (ranked.by_mean != ranked.by_kemeny).any())
        out.append(Outcome(entry.name, "orders differ: " + ", ".join(f"{k} top {v}"
                                                                     for k, v in top.items()),
                           None, None, differs))
    return out


def draw(entry: Entry, exp_dir: Path, figures: Path) -> None:
    kind, _, spec = entry.plot.partition(":")
    flag = ["--heatmap", spec] if kind == "heatmap" else ["--plot", entry.plot]
    flag += ["--group-by", entry.group_by] if entry.group_by else []
    subprocess.run([sys.executable, str(ROOT / "run.py"), "analyze", str(exp_dir), *flag,
                    "--out", str(figures / entry.name)], cwd=ROOT, check=True,
                   capture_output=True)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="each entry's reduced-size overrides")
    p.add_argument("--only", help="comma-separated entry names (default: all)")
    p.add_argument("--backend", choices=["ray", "inline"], default="inline")
    p.add_argument("--log-dir", help="keep the logs here (default: a temporary folder)")
    p.add_argument("--figures", help="redraw each entry's figure under this folder")
    p.add_argument("--markdown", help="also write the outcome table to this file (Markdown)")
    args = p.parse_args()
    names = {e.name for e in ENTRIES}
    only = set(args.only.split(",")) if args.only else names
    if only - names:
        p.error(f"--only: unknown {sorted(only - names)}; entries: {', '.join(sorted(names))}")
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = Path(args.log_dir or tmp)
        rows, failed = [], 0
        for entry in (e for e in ENTRIES if e.name in only):
            try:
                seconds = run_sweep(entry, log_dir, args.quick, args.backend)
            except RuntimeError as e:
                print(e, file=sys.stderr)
                failed += 1
                continue
            exp_dir = log_dir / _experiment(entry)
            outcomes = judge(entry, exp_dir)
            if args.figures:
                draw(entry, exp_dir, Path(args.figures))
            for o in outcomes:
                verdict = {True: "reproduced", False: "NOT reproduced", None: "no value"}[o.held]
                rows.append((o.entry, o.check, _fmt(o.method), _fmt(o.baseline), verdict))
                print(f"{o.entry:<20} {verdict:<15} {_fmt(o.method):>8} {_fmt(o.baseline):>8}"
                      f"  {o.check}  ({seconds:.0f} s)", flush=True)
    held = sum(r[4] == "reproduced" for r in rows)
    if args.markdown:
        lines = ["| entry | claim checked | method | baseline | outcome |", "| --- " * 5 + "|"]
        lines += [f"| {e} | `{c}` | {a} | {b} | {v} |" for e, c, a, b, v in rows]
        Path(args.markdown).write_text("\n".join(lines) + "\n")
    print(f"\n{held} of {len(rows)} claims reproduced"
          f"{' (quick sizes)' if args.quick else ''}; {failed} sweeps failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

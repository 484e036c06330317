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


class Check(NamedTuple):
    """The claim's direction: `metric` of the `method` runs is better (`higher` or `lower`)
    than that of the `baseline` runs; each side is a `key=value` filter of the sweep's runs."""

    metric: str
    better: str  # "higher" | "lower"
    method: str
    baseline: str


class Entry(NamedTuple):
    name: str  # configs/papers/<name>.yaml, docs/figures/<name>/
    paper: str
    claim: str
    checks: tuple[Check, ...]
    plot: str = "accuracy:round"  # analyze --plot (or "heatmap:K1,K2")
    quick: tuple[str, ...] = ("rounds=20",)  # overrides for --quick
    target: float | None = None  # analyze --target, for rounds/vtime_to_target

    @property
    def sweep(self) -> Path:
        return ROOT / "configs" / "papers" / f"{self.name}.yaml"


def _higher(metric: str, method: str, baseline: str) -> Check:
    return Check(metric, "higher", method, baseline)


def _lower(metric: str, method: str, baseline: str) -> Check:
    return Check(metric, "lower", method, baseline)


ACC = "final_accuracy"
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


def _mean(runs, side: str, metric: str) -> float | None:
    chosen = filter_runs(runs, [parse_filter(side)])
    values = metric_values(chosen.summary, metric) if chosen.summary.num_rows else np.array([])
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


def judge(entry: Entry, exp_dir: Path) -> list[Outcome]:
    runs = load_runs(exp_dir, entry.target if entry.target is not None else 0.8)
    out = []
    for c in entry.checks:
        a, b = _mean(runs, c.method, c.metric), _mean(runs, c.baseline, c.metric)
        held = None if a is None or b is None else (a > b if c.better == "higher" else a < b)
        sign = ">" if c.better == "higher" else "<"
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
    print(f"\n{held} of {len(rows)} claims reproduced"
          f"{' (quick sizes)' if args.quick else ''}; {failed} sweeps failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Ranking systems across scenarios, as "What are the best systems? New perspectives on NLP
Benchmarking" (Colombo, Noiry, Irurozki & Clémençon, NeurIPS 2022) proposes: instead of
averaging scores over tasks (which lets one task's scale dominate), rank the systems in each
task and aggregate the rankings, by Borda count and by the Kemeny consensus.

    python run.py analyze logs/byzantine --rank aggregation --across attack.kind

The systems are the values of the `--rank` key (e.g. `aggregation`, its chain's label); the
scenarios are the values of the `--across` key, crossed with the metrics (default
final_accuracy). In each (scenario, metric) the systems are ranked by their mean over the
runs there (seeds), best first (a lower-is-better metric, such as rounds_to_target, is
negated); then the rankings are aggregated by Borda and by Kemeny (policies/ranks.py) and
shown next to the mean-score ranking (each metric's scores min-max scaled per scenario, then
averaged). Rows where the aggregations disagree with the mean are marked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from engine.analysis.summary import Runs, key_values, value_order
from engine.core.errors import ConfigError
from policies.ranks import (
    borda,
    kemeny,
    kendall_tau_distance,
    ranking_from_scores,
    total_kendall_distance,
)

LOWER_IS_BETTER = frozenset({"rounds_to_target", "vtime_to_target", "wall_s", "consensus_dist",
                             "bytes"})


class Ranked(NamedTuple):
    systems: list  # the --rank key's values, in the order of the rows
    scenarios: list[str]  # "attack.kind=alie, final_accuracy", one per ranking
    rankings: np.ndarray  # int [scenarios, systems]: rank positions, 0 = best
    mean_scores: np.ndarray  # float [systems]: the scaled scores averaged over scenarios
    by_mean: np.ndarray  # int [systems]: rank positions by mean score
    by_borda: np.ndarray
    by_kemeny: np.ndarray


def rank_systems(runs: Runs, rank_key: str, across: str,
                 metrics: Sequence[str] = ("final_accuracy",)) -> Ranked:
    """Rankings of the `rank_key` values in every (across value, metric), and their
    aggregations. One ConfigError line if a system is missing from a scenario."""
    systems_of = key_values(runs, rank_key)
    scenario_of = key_values(runs, across)
    systems = sorted(set(systems_of), key=value_order)
    scenarios = sorted(set(scenario_of), key=value_order)
    if len(systems) < 2:
        raise ConfigError(f"--rank {rank_key}: needs at least 2 values among the runs "
                          f"(found {systems})")
    labels, rows, scaled = [], [], []
    for metric in metrics:
        values = np.array([np.nan if v is None else float(v)
                           for v in runs.summary[metric].to_pylist()])
        sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
        for scenario in scenarios:
            means = []
            for system in systems:
                picked = [v for v, s, c in zip(values, systems_of, scenario_of, strict=True)
                          if s == system and c == scenario and not np.isnan(v)]
                if not picked:
                    raise ConfigError(f"--rank {rank_key}: {rank_key}={system} has no run with "
                                      f"a {metric} where {across}={scenario}")
                means.append(sign * float(np.mean(picked)))
            means = np.array(means)
            labels.append(f"{across}={scenario}, {metric}")
            rows.append(ranking_from_scores(means))
            span = means.max() - means.min()
            scaled.append((means - means.min()) / span if span > 0 else np.zeros_like(means))
    rankings = np.array(rows, dtype=np.int64)
    mean_scores = np.mean(scaled, axis=0)
    return Ranked(systems, labels, rankings, mean_scores, ranking_from_scores(mean_scores),
                  borda()(rankings).ranking, kemeny()(rankings).ranking)


def render(ranked: Ranked, rank_key: str) -> str:
    """The table: each system's mean scaled score and its three ranks (1 = best), '*' where
    Borda or Kemeny disagrees with the mean; then each aggregation's total Kendall tau
    distance to the scenarios' rankings and to the mean ranking."""
    header = [rank_key, "mean_score", "mean_rank", "borda_rank", "kemeny_rank", ""]
    order = np.argsort(ranked.by_kemeny, kind="stable")
    body = []
    for i in order:
        differs = ranked.by_mean[i] not in (ranked.by_borda[i], ranked.by_kemeny[i]) or \
            ranked.by_borda[i] != ranked.by_kemeny[i]
        body.append([str(ranked.systems[i]), f"{ranked.mean_scores[i]:.3f}",
                     str(ranked.by_mean[i] + 1), str(ranked.by_borda[i] + 1),
                     str(ranked.by_kemeny[i] + 1), "*" if differs else ""])
    widths = [max(len(r[c]) for r in [header, *body]) for c in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if c else cell.ljust(w) for c, (cell, w) in
                       enumerate(zip(row, widths, strict=True))).rstrip()
             for row in [header, *body]]
    more = "; ..." if len(ranked.scenarios) > 3 else ""
    lines.append(f"({len(ranked.scenarios)} rankings: {'; '.join(ranked.scenarios[:3])}{more})")
    for name, ranking in (("mean", ranked.by_mean), ("borda", ranked.by_borda),
                          ("kemeny", ranked.by_kemeny)):
        lines.append(f"{name:>6}: total Kendall tau distance to the rankings "
                     f"{total_kendall_distance(ranking, ranked.rankings)}, to the mean ranking "
                     f"{kendall_tau_distance(ranking, ranked.by_mean)}")
    return "\n".join(lines)

"""Rank aggregation: one consensus ranking from K clients' rankings of the same M items.

For policies that aggregate rankings rather than parameters (FRL's supermask edge rankings,
peer-ranked consensus). Every entry of `RANKING` follows one contract:

    aggregate = RANKING[name](**params)             # a pure function, pickles into a Ray task
    result = aggregate(rankings)                    # RankResult(ranking, scores)

    rankings: int [K, M]. Row k is client k's ranking as rank positions: rankings[k, j] is the
              position of item j for client k, 0 = best; each row is a permutation of 0..M-1.
    ranking:  int64 [M], the consensus in the same convention (a permutation of 0..M-1).
    scores:   float64 [M], higher = better, and ranking == ranking_from_scores(scores).

Every aggregator is deterministic, invariant to the order of the clients (it only sees sums
over clients), and breaks ties in favour of the lower item index.

Bradley-Terry also reads a matrix of pairwise win counts directly
(`bradley_terry_from_comparisons`); `pairwise_wins` builds that matrix from rankings.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from itertools import permutations
from typing import NamedTuple

import numpy as np
from scipy.sparse.csgraph import connected_components

from engine.core.errors import ConfigError
from engine.core.plugins import Registry

KEMENY_EXACT_MAX_ITEMS = 7  # 7! = 5040 orders: brute force stays instant


class RankResult(NamedTuple):
    ranking: np.ndarray  # int64 [M]: consensus rank position of each item, 0 = best
    scores: np.ndarray  # float64 [M]: higher = better; the ranking sorts them descending


RankAggregator = Callable[[np.ndarray], RankResult]


# ---------------------------------------------------------------- conventions and checks


def ranking_from_scores(scores: np.ndarray) -> np.ndarray:
    """Rank positions (int64, 0 = best) from scores, higher = better, along the last axis;
    equal scores go to the lower item index first. Works on [M] and on [K, M]."""
    scores = np.asarray(scores)
    order = np.argsort(-scores, axis=-1, kind="stable")  # best item first
    return np.argsort(order, axis=-1, kind="stable").astype(np.int64)


def items_best_first(ranking: np.ndarray) -> np.ndarray:
    """The items in consensus order (int64 [M]): the inverse permutation of `ranking`."""
    return np.argsort(np.asarray(ranking), kind="stable").astype(np.int64)


def check_rankings(rankings: np.ndarray, where: str) -> np.ndarray:
    """`rankings` as int64 [K, M] with every row a permutation of 0..M-1, or a one-line
    ConfigError naming `where.rankings`."""
    r = np.asarray(rankings)
    if r.ndim != 2 or r.shape[0] == 0 or r.shape[1] == 0:
        raise ConfigError(f"{where}.rankings: expected a non-empty [K, M] array, "
                          f"got shape {r.shape}")
    if not np.issubdtype(r.dtype, np.integer):
        raise ConfigError(f"{where}.rankings: expected integer rank positions, got {r.dtype}")
    m = r.shape[1]
    bad = np.flatnonzero((np.sort(r, axis=1) != np.arange(m)).any(axis=1))
    if bad.size:
        raise ConfigError(f"{where}.rankings: row {bad[0]} is not a permutation of 0..{m - 1}")
    return r.astype(np.int64, copy=False)


def _check_permutation(ranking: np.ndarray, where: str) -> np.ndarray:
    return check_rankings(np.asarray(ranking)[None, :], where)[0]


def _require(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {message}")


def pairwise_wins(rankings: np.ndarray) -> np.ndarray:
    """int64 [M, M]: wins[i, j] = the number of clients that rank item i above item j.
    wins + wins.T = K off the diagonal, and row sums are the Borda scores."""
    r = check_rankings(rankings, "ranking.pairwise_wins")
    m = r.shape[1]
    wins = np.zeros((m, m), dtype=np.int64)
    for row in r:  # one [M, M] comparison per client keeps memory at O(M^2)
        wins += row[:, None] < row[None, :]
    return wins


# ---------------------------------------------------------------- Kendall tau


def kendall_tau_distance(a: np.ndarray, b: np.ndarray) -> int:
    """The number of item pairs that rankings a and b (rank positions) order differently.

    Counts the inversions of b read in a's order with a Fenwick tree: O(M log M)."""
    a = _check_permutation(a, "ranking.kendall_tau_distance.a")
    b = _check_permutation(b, "ranking.kendall_tau_distance.b")
    _require(a.size == b.size, "ranking.kendall_tau_distance.b",
             f"length {b.size} differs from a's {a.size}")
    sequence = b[items_best_first(a)]  # b's positions, in a's order
    m = sequence.size
    tree = [0] * (m + 1)  # counts of positions seen so far
    inversions = 0
    for seen, value in enumerate(sequence.tolist()):
        i, not_greater = value + 1, 0
        while i > 0:  # how many earlier positions are <= value
            not_greater += tree[i]
            i -= i & -i
        inversions += seen - not_greater
        i = value + 1
        while i <= m:
            tree[i] += 1
            i += i & -i
    return inversions


def _distance_from_wins(ranking: np.ndarray, wins: np.ndarray) -> int:
    """Sum over clients of the Kendall distance of `ranking`, from the pairwise win counts:
    each pair (i above j in ranking) costs the wins[j, i] clients that put j above i."""
    above = ranking[:, None] < ranking[None, :]
    return int(wins.T[above].sum())


def total_kendall_distance(ranking: np.ndarray, rankings: np.ndarray) -> int:
    """sum_k kendall_tau_distance(ranking, rankings[k]): the Kemeny objective."""
    ranking = _check_permutation(ranking, "ranking.total_kendall_distance.ranking")
    wins = pairwise_wins(rankings)
    _require(ranking.size == wins.shape[0], "ranking.total_kendall_distance.ranking",
             f"length {ranking.size} differs from the rankings' M={wins.shape[0]}")
    return _distance_from_wins(ranking, wins)


# ---------------------------------------------------------------- Borda and FRL


def _borda(rankings: np.ndarray) -> RankResult:
    r = check_rankings(rankings, "ranking.borda")
    scores = (r.shape[1] - 1 - r).sum(axis=0).astype(np.float64)
    return RankResult(ranking_from_scores(scores), scores)


def borda() -> RankAggregator:
    """Borda count (de Borda, 1781; as a rank aggregation rule in Dwork, Kumar, Naor &
    Sivakumar, "Rank aggregation methods for the web", WWW 2001): an item in position p of
    a client's ranking of M items scores M-1-p; scores are summed over clients and the
    consensus sorts them in descending order (ties: lower item index first)."""
    return partial(_borda)


def _frl_vote(rankings: np.ndarray) -> RankResult:
    r = check_rankings(rankings, "ranking.frl_vote")
    ascending_index = r.shape[1] - 1 - r  # FRL's convention: the last index is the best edge
    reputation = ascending_index.sum(axis=0).astype(np.float64)
    return RankResult(ranking_from_scores(reputation), reputation)


def frl_vote() -> RankAggregator:
    """The FRL server's majority vote (Mozaffari, Shejwalkar & Houmansadr, "Every Vote Counts:
    Ranking-Based Training of Federated Learning to Resist Poisoning Attacks", USENIX Security
    2023; arXiv:2110.04350, "FRL: Federated Rank Learning").

    In FRL every client trains supermask scores for the edges of a fixed random network and
    sends its ranking: the edge ids sorted by score in *ascending* order, so an edge's index in
    that list is higher the more important it is (index M-1 = the best edge). The server's
    vote gives each edge a reputation, the sum over clients of that index, sorts edges by
    reputation, and the top k edges (the highest reputations) form the global subnetwork.

    Here client rankings use this module's convention (position 0 = best), so FRL's index of
    edge j for client k is M-1-rankings[k, j]; the returned scores are FRL's reputations
    (higher = more important) and the ranking sorts them descending. The reputation equals the
    Borda score: FRL's vote is a Borda count, where each client's ranking weighs the same
    (one vote), which bounds what a poisoning client can shift. Ties go
    to the lower edge index (FRL leaves them to its sort). FRL ranks and masks each layer's
    edges separately: call this once per layer. `frl_client_ranking` turns scores into
    rankings, `frl_top_k_mask` turns the consensus into the subnetwork mask."""
    return partial(_frl_vote)


def frl_client_ranking(edge_scores: np.ndarray) -> np.ndarray:
    """A client's FRL message in this module's convention: rank positions of its supermask
    edge scores ([M] or [K, M]), 0 = the highest score, ties to the lower edge index."""
    scores = np.asarray(edge_scores, dtype=np.float64)
    _require(bool(np.isfinite(scores).all()), "ranking.frl_client_ranking.edge_scores",
             "scores must be finite")
    return ranking_from_scores(scores)


def frl_top_k_mask(ranking: np.ndarray, k: int) -> np.ndarray:
    """FRL's subnetwork: bool [M], True for the k best edges of a consensus ranking (FRL keeps
    the top k% of each layer's edges: k = int(fraction * M) for that layer)."""
    ranking = _check_permutation(ranking, "ranking.frl_top_k_mask.ranking")
    _require(isinstance(k, int | np.integer) and not isinstance(k, bool) and 0 <= k <= ranking.size,
             "ranking.frl_top_k_mask.k", f"must be an integer in 0..{ranking.size}, got {k!r}")
    return ranking < k


# ---------------------------------------------------------------- Kemeny


def _best_insertion(order: np.ndarray, wins: np.ndarray) -> tuple[int, int, int]:
    """The single-item move (from position p to position q of `order`) that lowers the total
    Kendall distance most: (change, p, q); the first (lowest p, then q) among equals."""
    m = order.size
    w = wins[np.ix_(order, order)]
    w = w - w.T  # w[p, r] > 0: more clients put the item at p above the item at r than below
    s = np.cumsum(w, axis=1)  # s[p, q] = sum_{r <= q} w[p, r]
    s_before = np.concatenate([np.zeros((m, 1), dtype=s.dtype), s[:, :-1]], axis=1)
    idx = np.arange(m)
    later = s - s[idx, idx][:, None]  # move down: the item passes positions p+1..q
    earlier = s_before - s_before[idx, idx][:, None]  # move up: it passes positions q..p-1
    change = np.where(idx[None, :] > idx[:, None], later, earlier)
    best = int(np.argmin(change))
    return int(change.flat[best]), best // m, best % m


def local_kemenization(order: np.ndarray, wins: np.ndarray, max_moves: int | None = None
                       ) -> np.ndarray:
    """Improve an order (items best first) by single-item moves (insertions; adjacent swaps
    are the shortest ones) while one strictly lowers the total Kendall distance. The result
    is locally Kemeny-optimal in the sense of Dwork et al. (2001): no adjacent pair is
    ordered against the majority, so it is consistent with a Condorcet order if one exists.
    Each move lowers an integer objective, so the search ends."""
    order = np.asarray(order, dtype=np.int64).copy()
    moves = 0
    while max_moves is None or moves < max_moves:
        change, p, q = _best_insertion(order, wins)
        if change >= 0:
            break
        order = np.insert(np.delete(order, p), q, order[p])
        moves += 1
    return order


def _best_input_ranking(r: np.ndarray, wins: np.ndarray) -> tuple[np.ndarray, int]:
    """The client ranking closest (total Kendall distance) to all of them; among equals the
    lexicographically smallest row, so the choice does not depend on the clients' order."""
    distances = np.array([_distance_from_wins(row, wins) for row in r])
    tied = r[distances == distances.min()]
    first = np.lexsort(tied.T[::-1])[0]
    return tied[first], int(distances.min())


def _kemeny(rankings: np.ndarray, max_moves: int | None) -> RankResult:
    r = check_rankings(rankings, "ranking.kemeny")
    m = r.shape[1]
    wins = pairwise_wins(r)
    start = _borda(r).ranking
    best_input, best_input_distance = _best_input_ranking(r, wins)
    if best_input_distance < _distance_from_wins(start, wins):
        start = best_input
    order = local_kemenization(items_best_first(start), wins, max_moves)
    ranking = np.argsort(order, kind="stable").astype(np.int64)
    return RankResult(ranking, (m - 1 - ranking).astype(np.float64))


def kemeny(max_moves: int | None = None) -> RankAggregator:
    """Kemeny-Young consensus (the ranking minimising the total Kendall tau distance to the
    client rankings), approximated as in Dwork, Kumar, Naor & Sivakumar, "Rank aggregation
    methods for the web", WWW 2001: a good starting ranking, then local Kemenization.

    Start: the better (lower total distance) of the Borda ranking and the best client ranking.
    The best client ranking is a 2-approximation (triangle inequality: for the optimum pi*,
    min_k sum_l d(r_k, r_l) <= 2 sum_l d(pi*, r_l)); Borda alone is only a 5-approximation
    (Coppersmith, Fleischer & Rudra, SODA 2006), so the result is within a factor 2 of the
    optimum and never worse than Borda. Then single-item moves that strictly lower the total
    distance, best move first, until none does (`max_moves` caps them; None = until then).
    When the pairwise majority is a strict total order (a Condorcet order) that order is the
    unique Kemeny optimum and is what this returns. Scores are M-1-position (the consensus
    order itself; `total_kendall_distance` gives the objective). Cost: O(M^2) per move."""
    _require(max_moves is None or max_moves >= 0, "ranking.kemeny.max_moves",
             f"must be >= 0 or None, got {max_moves!r}")
    return partial(_kemeny, max_moves=max_moves)


def kemeny_exact(rankings: np.ndarray) -> RankResult:
    """The exact Kemeny-Young consensus by brute force over all M! orders (M <= 7), the
    reference for `kemeny` in tests. Among optimal orders, the lexicographically smallest list
    of items best-first (lower item indices first)."""
    r = check_rankings(rankings, "ranking.kemeny_exact")
    m = r.shape[1]
    _require(m <= KEMENY_EXACT_MAX_ITEMS, "ranking.kemeny_exact.rankings",
             f"M={m} items is too many for brute force (at most {KEMENY_EXACT_MAX_ITEMS})")
    wins = pairwise_wins(r)
    orders = np.array(list(permutations(range(m))), dtype=np.int64)  # lexicographic
    cost = np.zeros(len(orders), dtype=np.int64)
    for above in range(m):
        for below in range(above + 1, m):  # clients who put the lower item above the upper one
            cost += wins[orders[:, below], orders[:, above]]
    ranking = np.argsort(orders[int(np.argmin(cost))], kind="stable").astype(np.int64)
    return RankResult(ranking, (m - 1 - ranking).astype(np.float64))


# ---------------------------------------------------------------- Bradley-Terry


def _row_sums(x: np.ndarray) -> np.ndarray:
    """Row sums that depend only on each row's multiset of values (sorted before summing):
    items with the same comparisons get bit-identical strengths, so exact ties stay ties."""
    return np.sort(x, axis=1).sum(axis=1)


def _strongly_connected(wins: np.ndarray) -> bool:
    count, _ = connected_components(wins > 0, directed=True, connection="strong")
    return count == 1


def bradley_terry_mm(comparisons: np.ndarray, pseudo_count: float = 0.1, tol: float = 1e-10,
                     max_iter: int = 100_000) -> np.ndarray:
    """Maximum-likelihood Bradley-Terry strengths (float64 [M], summing to 1) from pairwise
    win counts, comparisons[i, j] = times item i beat item j (the diagonal is ignored).

    Model (Bradley & Terry, Biometrika 1952): P(i beats j) = g_i / (g_i + g_j). Fitted by
    Hunter's MM algorithm (Hunter, "MM algorithms for generalized Bradley-Terry models",
    Annals of Statistics 2004, eq. 3): g_i <- W_i / sum_{j != i} n_ij / (g_i + g_j), where
    W_i is i's total wins and n_ij = w_ij + w_ji, then g /= sum(g); stop when no log strength
    moves more than `tol` (or after `max_iter` steps). The MLE exists and is unique iff the
    graph "i beat j" is strongly connected (Hunter's Assumption 1); `pseudo_count` adds that
    many wins to every ordered pair (a ridge-like prior) so it always is and strengths stay
    finite and positive. pseudo_count=0 fits the plain MLE and needs a strongly connected
    comparison graph."""
    where = "ranking.bradley_terry"
    w = np.array(comparisons, dtype=np.float64)
    _require(w.ndim == 2 and w.shape[0] == w.shape[1] and w.shape[0] > 0,
             f"{where}.comparisons", f"expected a square [M, M] matrix, got shape {w.shape}")
    _require(bool(np.isfinite(w).all() and (w >= 0).all()), f"{where}.comparisons",
             "win counts must be finite and >= 0")
    m = w.shape[0]
    np.fill_diagonal(w, 0.0)
    w += pseudo_count * (1.0 - np.eye(m))
    if m == 1:
        return np.ones(1)
    _require(_strongly_connected(w), f"{where}.pseudo_count",
             "the comparisons are not strongly connected (some group never beats the rest), "
             "so the MLE is not finite: use pseudo_count > 0")
    total_wins = _row_sums(w)
    played = w + w.T
    strength = np.full(m, 1.0 / m)
    for _ in range(max_iter):
        new = total_wins / _row_sums(played / (strength[:, None] + strength[None, :]))
        new /= new.sum()
        converged = np.abs(np.log(new) - np.log(strength)).max() <= tol
        strength = new
        if converged:
            break
    return strength


def bradley_terry_from_comparisons(comparisons: np.ndarray, pseudo_count: float = 0.1,
                                   tol: float = 1e-10, max_iter: int = 100_000) -> RankResult:
    """Consensus from a [M, M] matrix of pairwise win counts: items by descending
    Bradley-Terry strength (`bradley_terry_mm`); the scores are the strengths."""
    _check_bradley_terry_params(pseudo_count, tol, max_iter)
    strength = bradley_terry_mm(comparisons, pseudo_count, tol, max_iter)
    return RankResult(ranking_from_scores(strength), strength)


def _bradley_terry(rankings: np.ndarray, pseudo_count: float, tol: float, max_iter: int
                   ) -> RankResult:
    wins = pairwise_wins(check_rankings(rankings, "ranking.bradley_terry"))
    return bradley_terry_from_comparisons(wins, pseudo_count, tol, max_iter)


def _check_bradley_terry_params(pseudo_count: float, tol: float, max_iter: int) -> None:
    _require(bool(np.isfinite(pseudo_count)) and pseudo_count >= 0,
             "ranking.bradley_terry.pseudo_count", f"must be finite and >= 0, got {pseudo_count!r}")
    _require(bool(np.isfinite(tol)) and tol > 0, "ranking.bradley_terry.tol",
             f"must be finite and > 0, got {tol!r}")
    _require(max_iter >= 1, "ranking.bradley_terry.max_iter", f"must be >= 1, got {max_iter!r}")


def bradley_terry(pseudo_count: float = 0.1, tol: float = 1e-10, max_iter: int = 100_000
                  ) -> RankAggregator:
    """Bradley-Terry consensus (Bradley & Terry, Biometrika 1952; MLE by Hunter's MM algorithm,
    Annals of Statistics 2004): each client's ranking counts as M(M-1)/2 pairwise results
    (`pairwise_wins`), the strengths are fitted by `bradley_terry_mm`, and the consensus sorts
    them descending; the scores are the strengths (sum 1). This is the pairwise-comparison
    model behind peer-ranked consensus (Larin et al., "Fortytwo: Swarm Inference with
    Peer-Ranked Consensus", arXiv:2510.24801, 2025, whose nodes compare peers' answers
    pairwise and aggregate with a Bradley-Terry-style model; its reputation weighting of the
    judges is not part of this rule). For raw comparison counts use
    `bradley_terry_from_comparisons`."""
    _check_bradley_terry_params(pseudo_count, tol, max_iter)
    return partial(_bradley_terry, pseudo_count=pseudo_count, tol=tol, max_iter=max_iter)


# ---------------------------------------------------------------- registry

RANKING: Registry[RankAggregator] = Registry("rank aggregator", {
    "frl_vote": frl_vote,
    "borda": borda,
    "kemeny": kemeny,
    "bradley_terry": bradley_terry,
})

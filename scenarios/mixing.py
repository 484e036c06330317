"""Mixing matrices of gossip averaging and their spectral gap.

W is a float64 scipy.sparse.csr_matrix [n, n]; W[i, j] is the weight receiver i gives to j's
model, so one gossip step is x_i <- sum_j W[i, j] x_j (row i: i itself and its in-neighbours).
Symmetric doubly stochastic W (Metropolis-Hastings, max-degree) keeps the average of the x_i;
column-stochastic W (push-sum) keeps their sum, and the average is recovered as x_i / w_i.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from scipy.sparse import csgraph

from engine.core.errors import ConfigError
from engine.core.plugins import Registry
from scenarios.topology import Graph

DENSE_MAX = 2048  # spectral_gap uses dense eigenvalues up to this many nodes


def _assemble(graph: Graph, arc_weights: np.ndarray, self_weights: np.ndarray) -> sp.csr_matrix:
    """W with W[dst, src] = arc_weights on the arcs and W[i, i] = self_weights."""
    n = graph.num_nodes
    i = np.arange(n, dtype=np.int64)
    rows = np.concatenate([graph.dst, i])
    cols = np.concatenate([graph.src, i])
    w = sp.csr_matrix((np.concatenate([arc_weights, self_weights]), (rows, cols)), shape=(n, n))
    w.sum_duplicates()  # canonical: sorted column indices per row
    return w


def _with_self_rest(graph: Graph, arc_weights: np.ndarray) -> sp.csr_matrix:
    """Row i's self weight is 1 - (the sum of its arc weights): rows sum to 1."""
    row_sums = np.bincount(graph.dst, weights=arc_weights, minlength=graph.num_nodes)
    return _assemble(graph, arc_weights, 1.0 - row_sums)


def _undirected_only(graph: Graph, kind: str) -> None:
    if graph.directed:
        raise ConfigError(f"gossip.mixing: {kind} needs an undirected graph (this one is "
                          "directed); use push_sum for a directed graph")


def metropolis_hastings(graph: Graph) -> sp.csr_matrix:
    """w_ij = 1 / (1 + max(d_i, d_j)) on each edge, w_ii = 1 - sum_j w_ij: symmetric and doubly
    stochastic: the Metropolis weights of Xiao, Boyd & Lall (2005, "A scheme for robust
    distributed sensor fusion based on average consensus")."""
    _undirected_only(graph, "metropolis_hastings")
    degree = graph.in_degree()
    arc_weights = 1.0 / (1.0 + np.maximum(degree[graph.src], degree[graph.dst]))
    return _with_self_rest(graph, arc_weights)


def max_degree(graph: Graph) -> sp.csr_matrix:
    """w_ij = 1 / (1 + d_max) on each edge, self weight the rest: symmetric and doubly
    stochastic; the constant edge weights of Xiao & Boyd (2004, "Fast linear iterations for
    distributed averaging") with alpha = 1 / (1 + d_max), so every self weight is positive."""
    _undirected_only(graph, "max_degree")
    d_max = int(graph.in_degree().max(initial=0))
    return _with_self_rest(graph, np.full(graph.num_arcs, 1.0 / (1.0 + d_max)))


def push_sum(graph: Graph) -> sp.csr_matrix:
    """Column stochastic: node j splits its mass uniformly over itself and its out-neighbours,
    W[i, j] = 1 / (1 + outdeg(j)) for each arc j -> i and for i == j (Kempe et al., 2003,
    "Gossip-based computation of aggregate information"; as in Stochastic Gradient Push,
    Assran et al., 2019). Iterate it on (x, w) from w = 1 and read x_i / w_i."""
    share = 1.0 / (1.0 + graph.out_degree())
    return _assemble(graph, share[graph.src], share)


push_sum.column_stochastic = True  # keeps sums, not averages: consensus=push_sum reads x / w

Mixing = Callable[[Graph], sp.csr_matrix]
MIXING: Registry[Mixing] = Registry("mixing", {
    "metropolis_hastings": metropolis_hastings, "max_degree": max_degree, "push_sum": push_sum,
}, runtime=("graph",))


def column_stochastic(mixing: Mixing) -> bool:
    """Whether the mixing keeps column sums (push-sum) rather than row sums."""
    return bool(getattr(getattr(mixing, "func", mixing), "column_stochastic", False))


def mixing_matrix(graph: Graph, mixing: Mixing, alive: np.ndarray | None = None
                  ) -> sp.csr_matrix:
    """W of `mixing` on the graph among living peers (alive bool [n]; None: all alive). A dead
    peer has no arcs there, so its row and column are the identity's and every row of a
    living peer is stochastic over living peers only."""
    return mixing(graph if alive is None else graph.restricted(alive))


def spectral_gap(w: sp.spmatrix | np.ndarray, maxiter: int = 1000) -> float:
    """1 - |lambda_2|, lambda_2 the eigenvalue second largest in magnitude (all eigenvalues,
    complex ones included, for a non-symmetric W). It sets the consensus rate: the distance to
    the average shrinks like |lambda_2|^t (Xiao & Boyd, 2004).

    A W whose support is not (strongly) connected has gap 0: eigenvalue 1 is repeated and the
    peers do not reach one average. Up to DENSE_MAX nodes the eigenvalues are dense
    (numpy.linalg.eigvalsh for symmetric W, eigvals otherwise); above, ARPACK (scipy eigsh / eigs,
    the 2 largest in magnitude) with at most `maxiter` restarts, and float('nan') when it does
    not converge (likely when the gap is tiny, e.g. a long ring)."""
    w = sp.csr_matrix(w, dtype=np.float64)
    n = w.shape[0]
    if n == 1:
        return 1.0
    support = w.copy()
    support.eliminate_zeros()
    if csgraph.connected_components(support, directed=True, connection="strong")[0] > 1:
        return 0.0
    symmetric = abs(w - w.T).max() <= 1e-12
    magnitudes = _top_magnitudes(w, symmetric, maxiter)
    return float("nan") if magnitudes is None else max(0.0, 1.0 - float(magnitudes[1]))


def _top_magnitudes(w: sp.csr_matrix, symmetric: bool, maxiter: int) -> np.ndarray | None:
    """|eigenvalues| in decreasing order (at least the first two); None if ARPACK fails."""
    if w.shape[0] <= DENSE_MAX:
        dense = w.toarray()
        values = np.linalg.eigvalsh(dense) if symmetric else np.linalg.eigvals(dense)
    else:
        solver = spla.eigsh if symmetric else spla.eigs
        try:
            values = solver(w, k=2, which="LM", maxiter=maxiter, return_eigenvectors=False)
        except spla.ArpackNoConvergence:
            return None
    return np.sort(np.abs(values))[::-1]


def degree_stats(graph: Graph) -> tuple[int, float, int]:
    """(min, mean, max) of the in-degree."""
    degree = graph.in_degree()
    return int(degree.min()), float(degree.mean()), int(degree.max())

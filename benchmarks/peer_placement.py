"""Which peers are boundary rows: a peer whose row of W reads a peer of another pool, or is
read by one, is exported (or imports) every gossip step. Pools own contiguous id blocks
(engine/backends/runtime.py shard_bounds); this measures the share of boundary rows for the
graph as generated, and after renumbering the peers by reverse Cuthill-McKee (scipy), for the
100k-peer graphs of issue 27, at 2, 4 and 8 pools.

    python benchmarks/peer_placement.py [--peers N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import reverse_cuthill_mckee

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.backends.runtime import pool_of, shard_bounds  # noqa: E402
from scenarios.topology import TOPOLOGIES  # noqa: E402


def boundary_share(src: np.ndarray, dst: np.ndarray, n: int, pools: int) -> float:
    """Share of peers with an arc to or from another pool's block."""
    bounds = shard_bounds(n, pools)
    cut = pool_of(bounds, src) != pool_of(bounds, dst)
    boundary = np.zeros(n, dtype=bool)
    boundary[src[cut]] = True
    boundary[dst[cut]] = True
    return float(boundary.mean())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers", type=int, default=100_000)
    args = p.parse_args()
    n = args.peers
    graphs = {"small_world k=4 beta=0.1": ("small_world", {"k": 4, "beta": 0.1}),
              "random_regular degree=4": ("random_regular", {"degree": 4})}
    print(f"{n:,} peers: share of boundary rows (contiguous id blocks per pool)")
    print(f"  {'graph':<28}{'order':<10}{'2 pools':>9}{'4 pools':>9}{'8 pools':>9}")
    for label, (kind, params) in graphs.items():
        graph = TOPOLOGIES.make(kind, "topology", None, **params)(n, np.random.default_rng(0))
        adjacency = sparse.csr_matrix((np.ones(graph.src.size), (graph.dst, graph.src)),
                                      shape=(n, n))
        t0 = time.perf_counter()
        order = reverse_cuthill_mckee(adjacency, symmetric_mode=True)
        seconds = time.perf_counter() - t0
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n)  # the new id of each peer
        for name, (s, d) in (("as drawn", (graph.src, graph.dst)),
                             ("RCM", (rank[graph.src], rank[graph.dst]))):
            shares = [boundary_share(s, d, n, pools) for pools in (2, 4, 8)]
            print(f"  {label:<28}{name:<10}" + "".join(f"{v:>9.2%}" for v in shares))
        print(f"  {'':<28}(RCM took {seconds:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Layout-independent sums: a fixed pairwise summation tree over client ids.

Node (level L, index i) covers client ids [i * 2**L, (i + 1) * 2**L). A leaf (level 0) holds
one client's value; a parent is left + right, or its only child when one side has no client.
Anyone who holds every client of a node's interval can compute that node, and gets the same
bits: so pools pre-reduce their own id range (hierarchical aggregation, as in LIFL) and the
driver finishes the same tree, with a result identical to the single-process sum for any split
of the ids into contiguous pool ranges. Pairwise summation is also more accurate than a
sequential sum.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

MAX_LEVEL = 48  # client ids < 2**48
ALL_IDS = (0, 1 << MAX_LEVEL)


class TreeSums(NamedTuple):
    """Partial sums over disjoint tree nodes, ordered by the first id they cover."""

    level: torch.Tensor  # int64 [m]
    index: torch.Tensor  # int64 [m]
    sums: torch.Tensor  # [m, P]

    @staticmethod
    def leaves(values: torch.Tensor, client_ids: torch.Tensor) -> TreeSums:
        if bool((client_ids[1:] < client_ids[:-1]).any()):
            order = torch.argsort(client_ids, stable=True)
            values, client_ids = values[order], client_ids[order]
        return TreeSums(torch.zeros_like(client_ids), client_ids, values)

    @staticmethod
    def concat(parts: list[TreeSums]) -> TreeSums:
        joined = TreeSums(*(torch.cat(columns) for columns in zip(*parts, strict=True)))
        return joined._sorted()

    def _sorted(self) -> TreeSums:
        order = torch.argsort(self.index << self.level, stable=True)
        return TreeSums(self.level[order], self.index[order], self.sums[order])


def merge(nodes: TreeSums, lo: int, hi: int, overwrite: bool = False) -> TreeSums:
    """Join nodes into their common ancestors, bottom-up, wherever the ancestor's whole
    interval lies in [lo, hi) (the ids this caller holds); the others stay as they are. Every
    ancestor's value is its left subtree's sum plus its right's, whoever joins them, so any
    split gives the same bits. A stack over the nodes in id order: two neighbours join at the
    level of their lowest common ancestor, lower levels first, each join one in-place row
    addition `left += right` on a single buffer (`nodes.sums` itself when `overwrite`).
    Measured on W1 (50 of a pool's 500 ids, 9,610 values each): 0.3 ms; the level-by-level
    numpy schedule with indexed additions it replaces took 1.0 ms, the same bits."""
    sums = nodes.sums if overwrite else nodes.sums.clone()
    values = sums.unbind(0)
    final: list[tuple[int, int, int]] = []  # (row, level, first id): joins nothing more
    stack: list[tuple[int, int, int]] = []  # the same; neighbours' common ancestors' levels
    #                                         fall towards the top

    def above(a: tuple, b: tuple) -> int:  # the level of a's and b's lowest common ancestor
        return (a[2] ^ b[2]).bit_length()

    def inside(level: int, first: int) -> bool:
        start = (first >> level) << level
        return start >= lo and start + (1 << level) <= hi

    def join() -> bool:  # the stack's top two, if their ancestor lies in [lo, hi)
        right, left = stack[-1], stack[-2]
        level = above(left, right)
        if not inside(level, left[2]):
            final.extend(stack)  # every join left in the stack is at this level or above
            stack.clear()
            return False
        values[left[0]].add_(values[right[0]])
        stack[-2:] = [(left[0], level, (left[2] >> level) << level)]
        return True

    levels, firsts = nodes.level.tolist(), (nodes.index << nodes.level).tolist()
    for node in zip(range(len(levels)), levels, firsts, strict=True):
        while len(stack) >= 2 and above(stack[-2], stack[-1]) < above(stack[-1], node):
            if not join():
                break
        if stack and not inside(above(stack[-1], node), node[2]):
            final.extend(stack)
            stack.clear()
        stack.append(node)
    while len(stack) >= 2 and join():
        pass
    final.extend(stack)  # in id order, as the nodes came
    level = torch.tensor([f[1] for f in final], dtype=torch.int64)
    return TreeSums(level, torch.tensor([f[2] for f in final], dtype=torch.int64) >> level,
                    sums[torch.tensor([f[0] for f in final], dtype=torch.int64)])


def total(nodes: TreeSums, width: int) -> torch.Tensor:
    """The root: the sum of every value under `nodes` ([width] zeros if there is none)."""
    if nodes.sums.shape[0] == 0:
        return torch.zeros(width, dtype=nodes.sums.dtype)
    root = merge(nodes, *ALL_IDS)
    assert root.sums.shape[0] == 1, "nodes must be disjoint"
    return root.sums[0]

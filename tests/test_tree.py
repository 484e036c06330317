"""The fixed id tree: any split into contiguous id ranges gives the same bits as no split."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.tree import ALL_IDS, TreeSums, merge, total


def split_total(values, ids, cuts):
    """Pre-reduce within each [cuts[i], cuts[i+1]) like pools do, then finish like the driver."""
    parts = []
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        inside = (ids >= lo) & (ids < hi)
        if inside.any():
            parts.append(merge(TreeSums.leaves(values[inside], ids[inside]), lo, hi))
    return total(TreeSums.concat(parts), values.shape[1])


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.integers(0, 10_000), st.data())
def test_any_contiguous_split_gives_identical_bits(n_ids, seed, data):
    rng = np.random.default_rng(seed)
    k = data.draw(st.integers(1, n_ids))
    ids = torch.from_numpy(np.sort(rng.choice(n_ids, k, replace=False)))
    scale = 10.0 ** rng.integers(-3, 4, (k, 1))  # mixed magnitudes make rounding order-sensitive
    values = torch.from_numpy((rng.standard_normal((k, 5)) * scale).astype(np.float32))
    cuts = st.lists(st.integers(1, max(1, n_ids - 1)), max_size=6) if n_ids > 1 else st.just([])
    inner = sorted(set(data.draw(cuts)))
    whole = total(TreeSums.leaves(values, ids), 5)
    assert torch.equal(split_total(values, ids, [0, *inner, n_ids]), whole)
    assert torch.allclose(whole.double(), values.double().sum(0), rtol=1e-5, atol=1e-3)


def test_hand_worked_tree():
    # ids 0,1,3 -> (v0 + v1) + v3 ; id 5 is alone under node (2, 1) -> root = that + v5
    values = torch.tensor([[1.0], [2.0], [4.0], [8.0]])
    ids = torch.tensor([0, 1, 3, 5])
    nodes = merge(TreeSums.leaves(values, ids), 0, 4)  # a pool holding ids 0..3
    assert nodes.level.tolist() == [2, 0] and nodes.index.tolist() == [0, 5]
    assert nodes.sums[:, 0].tolist() == [7.0, 8.0]
    assert total(nodes, 1).tolist() == [15.0]


def test_empty_and_single():
    none = TreeSums.leaves(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64))
    assert torch.equal(total(none, 3), torch.zeros(3))
    one = TreeSums.leaves(torch.tensor([[2.5, -1.0]]), torch.tensor([42]))
    assert torch.equal(total(one, 2), torch.tensor([2.5, -1.0]))
    assert merge(one, *ALL_IDS).sums.shape == (1, 2)

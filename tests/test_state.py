"""Per-client state: LazyRows stores rows only for clients written, and reads, puts and adds
exactly as the dense RowState does."""

from __future__ import annotations

import pickle

import torch

from engine.compute.state import LazyRows, RowState


def test_lazy_rows_equal_dense_rows_under_random_writes():
    g = torch.Generator().manual_seed(0)
    dense, lazy = RowState(50, 7), LazyRows(50, 7)
    written = set()
    for step in range(40):
        local = torch.randperm(50, generator=g)[: int(torch.randint(1, 9, (1,), generator=g))]
        values = torch.randn(local.numel(), 7, generator=g)
        op = step % 3
        if op == 0:
            dense.put(local, values)
            lazy.put(local, values)
            written |= set(local.tolist())
        elif op == 1:
            keep = torch.rand(local.numel(), generator=g) < 0.5
            dense.put(local, values, keep=keep)
            lazy.put(local, values, keep=keep)
            written |= set(local[keep].tolist())
        else:
            dense.add(local, values)
            lazy.add(local, values)
            written |= set(local.tolist())
        probe = torch.randperm(50, generator=g)[:10]
        assert torch.equal(lazy[probe], dense[probe])
        assert lazy.stored == len(written)  # rows only for clients written
    assert torch.equal(lazy[torch.arange(50)], dense.rows)
    again = pickle.loads(pickle.dumps(lazy))  # a checkpoint holds it whole
    assert torch.equal(again[torch.arange(50)], dense.rows)
    lazy.zero_()
    assert lazy.stored == 0 and not lazy[torch.arange(50)].any()

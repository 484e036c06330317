"""Per-client state: LazyRows stores rows only for clients written, and reads, puts and adds
exactly as the dense RowState does."""

from __future__ import annotations

import pickle

import torch

from engine.compute.state import LazyRows, PeerModels, RowState


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


def test_peer_rows_read_and_step_alike_by_slice_and_by_index():
    """PeerModels.rows/step take consecutive rows as a slice, others by index: the same
    values, the rows read are a copy either way, and push-sum masses de-bias them."""
    g = torch.Generator().manual_seed(1)
    numer = torch.randn(9, 4, generator=g)
    a, b = PeerModels(numer.clone()), PeerModels(numer.clone())
    run, scattered = torch.arange(2, 7), torch.tensor([0, 3, 8])
    for local in (run, scattered):
        delta = torch.randn(local.numel(), 4, generator=g)
        a.step(local, delta)
        b.numer[local] += delta  # the indexed update it replaces
        rows = a.rows(local)
        assert torch.equal(rows, b.numer[local])
        rows += 1.0  # a copy: the state does not move
        assert torch.equal(a.numer, b.numer)
    a.mass[3] = b.mass[3] = 2.0
    assert torch.equal(a.rows(run), (b.numer / b.mass[:, None])[run])

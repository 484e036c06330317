"""Streaming DiLoCo (policies/streaming.py, the workers in engine/compute/pool.py): the FP4
quantiser and fragments by hand, the outer step per fragment against a float64 loop, the
workers' merge with overlap and mixing, and P = 1 unquantised = DiLoCo's run, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.compute.pool import WorkerModels
from engine.core.errors import ConfigError
from engine.experiment import prepare, run_experiment
from policies.optimizers import diloco_outer
from policies.streaming import (
    Streaming,
    fragment_bounds,
    fragment_bytes,
    quantize_e3m0,
    streaming_diloco_outer,
)
from tests.conftest import small_config
from tests.test_world_loop import INLINE, world_of


def test_e3m0_by_hand():
    """Scale 1: 0.3 -> 0.25 (nearer than 0.5), 0.7 -> 0.5, 0.001 -> 0 (nearer than 2^-6),
    0.05 -> 0.0625; signs kept; a row scaled by 2 gives twice the values; zeros stay."""
    x = torch.tensor([[1.0, -0.3, 0.7, 0.001, -0.05], [2.0, -0.6, 1.4, 0.002, -0.1],
                      [0.0] * 5])
    expected = torch.tensor([[1.0, -0.25, 0.5, 0.0, -0.0625]])
    out = quantize_e3m0(x)
    assert torch.equal(out[0], expected[0]) and torch.equal(out[1], 2 * expected[0])
    assert torch.equal(out[2], torch.zeros(5))
    assert quantize_e3m0(torch.tensor([[1.0, 0.75, 0.74, 1 / 128, 1 / 127]])).tolist() == \
        [[1.0, 0.5, 0.5, 0.0, 1 / 64]]  # ties to the smaller; 2^-7 halfway between 0 and 2^-6


def test_fragments_and_bytes():
    assert [fragment_bounds(10, 3, p) for p in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert fragment_bytes(10, 3, 4) == 2 + 4 and fragment_bytes(10, 3, 32) == 16


def test_outer_step_per_fragment_against_a_float64_loop():
    """P = 2 over 5 coordinates: step t updates fragment t mod 2 with its own Nesterov
    buffer (b <- m b + d; step = lr (d + m b)), zero elsewhere; P = 1 is diloco_outer."""
    lr, m = 0.7, 0.9
    deltas = [torch.tensor(v) for v in ([1.0, -2, 3, 0.5, 1], [0.5, 1, -1, 2, -3],
                                        [2.0, 2, 2, -1, 1], [-1.0, 0, 1, 1, 1])]
    agg = streaming_diloco_outer(lr, m, fragments=2)
    state = agg.init(torch.zeros(5))
    buf = np.zeros(5)
    for t, d in enumerate(deltas):
        step, state = agg.update(d, state)
        sl = slice(0, 3) if t % 2 == 0 else slice(3, 5)
        want = np.zeros(5)
        buf[sl] = m * buf[sl] + d.double().numpy()[sl]
        want[sl] = lr * (d.double().numpy()[sl] + m * buf[sl])
        np.testing.assert_allclose(step.double().numpy(), want, rtol=1e-6)
    one, ref = streaming_diloco_outer(fragments=1), diloco_outer()
    s1, s2 = one.init(torch.zeros(5)), ref.init(torch.zeros(5))
    for d in deltas:
        (a, s1), (b, s2) = one.update(d, s1), ref.update(d, s2)
        assert torch.equal(a, b)


def test_workers_merge_with_overlap_and_mixing():
    """2 workers, 4 parameters in 2 fragments, tau = 1, alpha = 0.5, unquantised. Round r
    sends fragment r mod 2 (own - global); the outer step of round r is merged into the
    workers at the start of round r + 2: own <- 0.5 own + 0.5 global."""
    s = Streaming(fragments=2, tau=1, alpha=0.5, bits=32)
    w = WorkerModels(2, 4)
    local, ok = torch.tensor([0, 1]), torch.ones(2, dtype=torch.bool)
    g0 = torch.tensor([1.0, 2.0, 3.0, 4.0])
    d = torch.tensor([[1.0, 1, 1, 1], [-1.0, 0, 2, 0]])
    start = w.start(local, g0, 0, s)
    assert torch.equal(start, g0.expand(2, 4))  # no own parameters yet
    sent = w.trained(local, g0, start, d, 0, s, ok)
    assert torch.equal(sent, torch.tensor([[1.0, 1, 0, 0], [-1.0, 0, 0, 0]]))
    g1 = torch.tensor([1.5, 2.5, 3.0, 4.0])  # the server stepped fragment 0
    start = w.start(local, g1, 1, s)  # round 1: nothing merged yet (overlap)
    assert torch.equal(start, g0 + d)
    sent = w.trained(local, g1, start, d, 1, s, ok)
    assert torch.equal(sent, torch.tensor([[0.0, 0, 2, 2], [0.0, 0, 4, 0]]))  # vs g1[2:]
    start = w.start(local, g1, 2, s)  # round 2 merges round 0's fragment 0
    own = g0 + 2 * d
    want = own.clone()
    want[:, :2] = 0.5 * own[:, :2] + 0.5 * g1[:2]
    assert torch.equal(start, want)


def _diloco(outer="diloco_outer", **training):
    return small_config(rounds=2, eval_every=0,
                        population={"num_clients": 6, "participation": {"clients_per_round": 6}},
                        training=training, aggregation=["weighted_mean", outer])


def test_one_fragment_unquantised_is_diloco(tmp_path):
    """P = 1, 32 bits, no overlap, alpha 0: the same bits as DiLoCo (weighted_mean then
    diloco_outer) over 2 rounds; 4 fragments at 4 bits send an eighth of a quarter."""
    plain = _diloco()
    stream = _diloco("streaming_diloco_outer",
                     streaming={"fragments": 1, "bits": 32, "tau": 0, "alpha": 0.0})
    a = run_experiment(plain, INLINE, tmp_path / "a", False)
    b = run_experiment(stream, INLINE, tmp_path / "b", False)
    assert torch.equal(a.loop.params, b.loop.params)


def test_a_round_sends_one_quantised_fragment():
    """A 1000-byte model (250 parameters) in 4 fragments: 63 down in float32 (252 B) and
    up in 4 bits (32 B) with a 4-byte scale, per worker, against 1000 B each way."""
    four = _diloco(streaming={"fragments": 4, "bits": 4})
    sizes = [20] * 6
    assert [world_of(c, sizes).plan(0).bytes for c in (_diloco(), four)] == \
        [6 * 2000, 6 * (252 + 32 + 4)]


def test_streaming_refusals():
    with pytest.raises(ConfigError, match="tau=2"):
        prepare(_diloco(streaming={"fragments": 2, "tau": 2}))
    with pytest.raises(ConfigError, match="training.streaming.*FedBuff"):
        from engine.resolve import resolve
        resolve(small_config(server={"mode": "fedbuff", "buffer": 2},
                             training={"streaming": {"fragments": 2}}))

"""Compressors: wire sizes and sparsity by hand, error feedback conserves the sum, keyed
determinism independent of batching, unbiasedness of the stochastic quantizers."""

import math
import pickle

import numpy as np
import pytest
import torch

from engine.core.errors import ConfigError
from policies.compression import (
    COMPRESSORS,
    kept_count,
    with_error_feedback,
)

KINDS = {
    "none": {},
    "topk": {"ratio": 0.1},
    "randomk": {"ratio": 0.2},
    "randomk_unbiased": {"ratio": 0.2, "unbiased": True},
    "quantize8": {},
    "qsgd": {"levels": 4},
    "sign": {},
}


def make(name: str):
    return COMPRESSORS.make(name.removesuffix("_unbiased"), **KINDS[name])


def rows(c: int, p: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(c, p, generator=torch.Generator().manual_seed(seed))


def keys(c: int, base: int = 1000) -> np.ndarray:
    return np.arange(base, base + c, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)


def test_registry_has_every_kind():
    assert set(COMPRESSORS) == {"none", "topk", "randomk", "quantize8", "qsgd", "sign"}


def test_kept_count_reads_ratio_as_written():
    assert kept_count(0.1, 30) == 3  # 0.1 * 30 = 3.0000000000000004 in floats
    assert kept_count(0.1, 31) == 4
    assert kept_count(0.001, 10) == 1  # at least one
    assert kept_count(1.0, 7) == 7


def test_topk_keeps_exactly_k_largest_and_counts_bytes():
    x = rows(5, 30)
    out = COMPRESSORS.make("topk", ratio=0.1).compress(x, keys(5))
    k = 3  # ceil(0.1 * 30)
    assert ((out.values != 0).sum(dim=1) == k).all()
    assert out.bytes.tolist() == [k * 8] * 5
    for c in range(5):
        expected = set(torch.argsort(x[c].abs(), descending=True)[:k].tolist())
        kept = set(torch.nonzero(out.values[c]).squeeze(1).tolist())
        assert kept == expected
        assert torch.equal(out.values[c, list(kept)], x[c, list(kept)])


def test_topk_ties_take_the_lower_index():
    x = torch.tensor([[1.0, -3.0, 2.0, 3.0, -2.0, 2.0, 0.5]])  # |.|: 3,3 then 2,2,2
    out = COMPRESSORS.make("topk", ratio=0.5).compress(x, keys(1))  # k = ceil(3.5) = 4
    assert out.values.tolist() == [[0.0, -3.0, 2.0, 3.0, -2.0, 0.0, 0.0]]
    assert out.bytes.tolist() == [32]


def test_wire_bytes_by_hand():
    p, x = 100, rows(2, 100)
    sizes = {
        "none": 4 * 100,
        "topk": 10 * 8,
        "randomk": 4 * 20 + 8,
        "randomk_unbiased": 4 * 20 + 8,
        "quantize8": 100 + 8,
        "qsgd": 4 + math.ceil(100 * (1 + 3) / 8),  # s = 4 -> ceil(log2 5) = 3 bits + sign
        "sign": math.ceil(100 / 8) + 4,
    }
    for name, size in sizes.items():
        out = make(name).compress(x, keys(2))
        assert out.bytes.dtype == np.int64 and out.bytes.tolist() == [size, size], name
        assert out.values.shape == (2, p) and out.values.dtype == torch.float32
    assert COMPRESSORS.make("qsgd", levels=1).compress(x, keys(2)).bytes[0] == 4 + 25  # 2 bits
    assert COMPRESSORS.make("sign").compress(rows(1, 9), keys(1)).bytes[0] == 2 + 4


def test_randomk_sends_k_coordinates_scaled_only_when_unbiased():
    x = rows(3, 50) + 10.0  # no zeros
    plain = COMPRESSORS.make("randomk", ratio=0.2).compress(x, keys(3))
    scaled = COMPRESSORS.make("randomk", ratio=0.2, unbiased=True).compress(x, keys(3))
    sent = plain.values != 0
    assert (sent.sum(dim=1) == 10).all()
    assert torch.equal(plain.values[sent], x[sent])
    assert torch.equal(scaled.values != 0, sent)  # same coordinates from the same keys
    assert torch.allclose(scaled.values[sent], x[sent] * 5.0)
    other = COMPRESSORS.make("randomk", ratio=0.2).compress(x, keys(3, base=7))
    assert not torch.equal(other.values != 0, sent)  # other keys, other coordinates


def test_sign_scale_by_hand():
    x = torch.tensor([[1.0, -2.0, 0.5, -0.5], [0.0, 3.0, -1.0, 0.0]])
    out = COMPRESSORS.make("sign").compress(x, keys(2))
    # ||x||_1 / P = 4 / 4 = 1 for both rows; sign(0) = 0
    assert out.values.tolist() == [[1.0, -1.0, 1.0, -1.0], [0.0, 1.0, -1.0, 0.0]]
    y = torch.tensor([[3.0, -1.0, 2.0]])  # 6 / 3 = 2
    assert COMPRESSORS.make("sign").compress(y, keys(1)).values.tolist() == [[2.0, -2.0, 2.0]]


def test_none_is_identity():
    x = rows(3, 17)
    out = COMPRESSORS.make("none").compress(x, keys(3))
    assert torch.equal(out.values, x) and out.values.data_ptr() != x.data_ptr()


def test_quantize8_codes_lie_on_the_grid_and_keep_min_max():
    x = rows(2, 300)
    out = COMPRESSORS.make("quantize8").compress(x, keys(2))
    lo, hi = x.min(dim=1).values.double(), x.max(dim=1).values.double()
    code = (out.values.double() - lo[:, None]) / ((hi - lo)[:, None] / 255)
    assert torch.allclose(code, code.round(), atol=1e-3)
    assert code.round().min() >= 0 and code.round().max() <= 255
    assert torch.allclose(out.values.min(dim=1).values, x.min(dim=1).values)
    assert torch.allclose(out.values.max(dim=1).values, x.max(dim=1).values)
    const = torch.full((1, 5), 2.5)
    assert torch.equal(COMPRESSORS.make("quantize8").compress(const, keys(1)).values, const)


def test_qsgd_levels_by_hand():
    x = torch.tensor([[3.0, -4.0, 0.0]])  # ||x|| = 5; s = 5 -> |x| / ||x|| * s = 3, 4, 0 exactly
    out = COMPRESSORS.make("qsgd", levels=5).compress(x, keys(1))
    assert torch.equal(out.values, x)
    assert torch.equal(COMPRESSORS.make("qsgd").compress(torch.zeros(2, 4), keys(2)).values,
                       torch.zeros(2, 4))
    y = rows(4, 64)
    got = COMPRESSORS.make("qsgd", levels=2).compress(y, keys(4)).values
    norms = torch.linalg.vector_norm(y, dim=1, keepdim=True)
    level = got.abs() / norms * 2  # integers in {0, 1, 2}, signs kept
    assert torch.allclose(level, level.round(), atol=1e-5) and level.max() <= 2 + 1e-5
    assert ((torch.sign(got) == torch.sign(y)) | (got == 0)).all()


@pytest.mark.parametrize("name", sorted(KINDS))
def test_error_feedback_conserves_the_sum(name):
    compressor = make(name)
    c, p, rounds = 4, 40, 12
    inputs = [rows(c, p, seed=t) for t in range(rounds)]
    residual, sent_total = None, torch.zeros(c, p, dtype=torch.float64)
    for t, x in enumerate(inputs):
        sent, residual, sizes = with_error_feedback(compressor, x, residual, keys(c, base=t * c))
        assert sizes.shape == (c,)
        sent_total += sent.double()
    total_in = torch.stack(inputs).double().sum(dim=0)
    # float32 rounding scales with the residual (which grows for the non-contractive, rescaled
    # randomk: error feedback wants a contractive compressor, Stich et al. 2018)
    tolerance = 1e-6 * (10 + residual.abs().max().item())
    assert (sent_total + residual.double() - total_in).abs().max() < tolerance
    if name == "none":
        assert torch.equal(residual, torch.zeros(c, p))
    else:
        assert residual.abs().max() > 0  # something was held back


def test_error_feedback_one_step_by_hand():
    x = torch.tensor([[1.0, 0.5, -3.0, 0.1]])
    e = torch.tensor([[0.0, 2.0, 0.0, 0.0]])
    sent, e2, sizes = with_error_feedback(COMPRESSORS.make("topk", ratio=0.5), x, e, keys(1))
    assert sent.tolist() == [[0.0, 2.5, -3.0, 0.0]]  # top 2 of x + e = [1, 2.5, -3, 0.1]
    assert e2.tolist() == [[1.0, 0.0, 0.0, pytest.approx(0.1)]]
    assert sizes.tolist() == [16]


@pytest.mark.parametrize("name", sorted(KINDS))
def test_deterministic_and_independent_of_batching(name):
    compressor, x, k = make(name), rows(6, 33), keys(6)
    together = compressor.compress(x, k)
    again = compressor.compress(x.clone(), k.copy())
    assert torch.equal(together.values, again.values)
    order = [4, 1, 5, 0, 3, 2]
    shuffled = compressor.compress(x[order], k[order])
    assert torch.equal(shuffled.values, together.values[order])
    for c in range(6):
        alone = compressor.compress(x[c:c + 1], k[c:c + 1])
        assert torch.equal(alone.values[0], together.values[c])
        assert alone.bytes[0] == together.bytes[c]


@pytest.mark.parametrize("name", ["randomk", "quantize8", "qsgd"])
def test_keys_drive_the_randomness(name):
    compressor, x = make(name), rows(3, 64)
    a = compressor.compress(x, keys(3)).values
    b = compressor.compress(x, keys(3, base=99)).values
    assert not torch.equal(a, b)


@pytest.mark.parametrize("name", ["quantize8", "qsgd", "randomk_unbiased"])
def test_stochastic_compressors_are_unbiased(name):
    """The mean of n keyed draws is within 5 standard errors of x, coordinate by coordinate."""
    compressor, x, n = make(name), rows(1, 16, seed=3), 4000
    draws = compressor.compress(x.expand(n, -1).contiguous(), keys(n)).values.double()
    std = draws.std(dim=0)
    assert (std > 0).sum() >= 14  # really random (quantize8 sends the row's min and max exactly)
    error = (draws.mean(dim=0) - x[0].double()).abs()
    assert (error <= 5 * std / math.sqrt(n) + 1e-6).all()


def test_biased_variants_fail_the_unbiasedness_check():
    """randomk without rescaling shrinks the mean to ratio * x: the check above would see it."""
    x, n = rows(1, 16, seed=3), 4000
    draws = make("randomk").compress(x.expand(n, -1).contiguous(), keys(n)).values.double()
    assert torch.allclose(draws.mean(dim=0), 0.2 * x[0].double(), atol=0.1)
    assert ((draws.mean(dim=0) - x[0]).abs() > 5 * draws.std(dim=0) / math.sqrt(n)).any()


def test_compressor_pickles():
    compressor = make("qsgd")
    x = rows(2, 10)
    again = pickle.loads(pickle.dumps(compressor))
    assert torch.equal(again.compress(x, keys(2)).values, compressor.compress(x, keys(2)).values)


@pytest.mark.parametrize("kind, params, message", [
    ("topk", {"ratio": 0}, r"^training\.compression\.ratio: .*greater than 0"),
    ("randomk", {"ratio": 1.5}, r"^training\.compression\.ratio: .*less than or equal to 1"),
    ("qsgd", {"levels": 0}, r"^training\.compression\.levels: .*greater than or equal to 1"),
    ("qsgd", {"levels": 2.5}, r"^training\.compression\.levels: .*integer"),
    ("sign", {"ratio": 0.1}, r"^training\.compression\.ratio: compressor 'sign' takes no"),
    ("bogus", {}, r"^training\.compression\.kind: unknown compressor 'bogus'; allowed: none"),
])
def test_bad_params_are_one_line_config_errors(kind, params, message):
    with pytest.raises(ConfigError, match=message) as err:
        COMPRESSORS.make(kind, "training.compression", **params)
    assert "\n" not in str(err.value)


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="keys"):
        COMPRESSORS.make("none").compress(rows(2, 3), keys(3))
    with pytest.raises(ValueError, match="float32"):
        COMPRESSORS.make("none").compress(torch.zeros(3), keys(1))


def test_unbiased_compressors_are_scaled_to_contract_in_compressed_gossip():
    """CHOCO-SGD needs E||C(x) - x||^2 <= (1 - delta)||x||^2: an unbiased C with variance
    omega becomes C / (1 + omega). QSGD: omega = min(P / s^2, sqrt(P) / s) (Alistarh et
    al., Lemma 3.1); unbiased random-k: P / k - 1. Biased kinds (contractive already) and
    quantize8 (its error is bounded by the row's range, not by omega ||x||^2) stay as they
    are."""
    from policies.compression import COMPRESSORS

    assert COMPRESSORS.make("qsgd", None, None, levels=4).contraction(400) == 1 / (1 + 5.0)
    assert COMPRESSORS.make("qsgd", None, None, levels=16).contraction(100) == 1 / (1 + 100 / 256)
    assert COMPRESSORS.make("randomk", None, None, ratio=0.1,
                            unbiased=True).contraction(50) == 1 / 10
    for kind in ("topk", "randomk", "sign", "quantize8", "none"):
        assert COMPRESSORS.make(kind).contraction(100) == 1.0

"""Known values for the robust reductions and transforms: hand-worked arrays, SciPy/NumPy
formulas, and direct P-space reimplementations (no Gram-matrix tricks) as references."""

import numpy as np
import pytest
import scipy.optimize
import scipy.stats
import torch

from engine.core import parallel
from engine.core.errors import ConfigError
from policies.flag import flag_aggregator
from policies.robust import (
    bulyan,
    centered_clipping,
    coordinate_median,
    geometric_median,
    krum,
    krum_scores,
    multi_krum,
    rank,
    trimmed_mean,
)
from policies.transforms import bucketing, clip_per_client, nnm
from tests.test_policies import updates


def run(agg, u, state=None):
    return agg.update(u, agg.init(torch.zeros(u.deltas.shape[1])) if state is None else state)


def random_updates(k, p, seed=0):
    g = torch.Generator().manual_seed(seed)
    return updates(torch.randn(k, p, generator=g).tolist(),
                   torch.randint(1, 50, (k,), generator=g).tolist())


@pytest.mark.parametrize("k", [7, 8])
def test_median_and_trimmed_mean_match_numpy_and_scipy(k):
    u = random_updates(k, 40)
    x = u.deltas.numpy()
    assert np.allclose(run(coordinate_median(), u)[0].numpy(), np.median(x, axis=0), atol=1e-7)
    got = run(trimmed_mean(trim=0.25), u)[0].numpy()
    assert np.allclose(got, scipy.stats.trim_mean(x, 0.25, axis=0), atol=1e-6)


def test_krum_and_multi_krum_hand_worked():
    # 1-D points 0, 1, 2, 10, 100 with f=1: each scores its 2 nearest squared distances:
    # 0 -> 1+4=5, 1 -> 1+1=2, 2 -> 1+4=5, 10 -> 64+81=145, 100 -> big. Krum picks 1;
    # Multi-Krum with m=2 averages 1 and 0 (0 and 2 tie at 5: the lower id wins).
    u = updates([[0.0], [1.0], [2.0], [10.0], [100.0]], [1] * 5)
    assert run(krum(f=1), u)[0].item() == 1.0
    assert run(multi_krum(f=1, m=2), u)[0].item() == 0.5
    # The default m = K - f = 4 drops only the outlier at 100.
    assert run(multi_krum(f=1), u)[0].item() == pytest.approx(13 / 4)


def test_byzantine_count_too_large_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^krum.f: f=2 is too large for K=5"):
        run(krum(f=2), updates([[0.0]] * 5, [1] * 5))


def test_geometric_median_matches_scipy_minimiser():
    u = updates([[0.0, 0.0], [4.0, 0.0], [0.0, 3.0], [5.0, 5.0], [40.0, -30.0]], [1, 2, 1, 3, 1])
    got = run(geometric_median(iterations=200, nu=1e-9), u)[0].double().numpy()
    x, a = u.deltas.double().numpy(), u.weights.double().numpy()
    ref = scipy.optimize.minimize(lambda z: (a * np.linalg.norm(x - z, axis=1)).sum(),
                                  x.mean(axis=0), method="Nelder-Mead",
                                  options={"xatol": 1e-10, "fatol": 1e-12}).x
    assert np.allclose(got, ref, atol=1e-4)


def test_centered_clipping_hand_worked():
    # v0 = 0, tau = 1: (3,0) is 3 away -> scaled by 1/3; (0,0.5) is kept:
    # v = ((1,0) + (0,0.5)) / 2 = (0.5, 0.25). The next round starts from that v.
    agg = centered_clipping(tau=1.0)
    u = updates([[3.0, 0.0], [0.0, 0.5]], [1, 1])
    v, state = run(agg, u)
    assert torch.allclose(v, torch.tensor([0.5, 0.25]))
    # round 2, same updates: x - v = (2.5,-0.25) (norm ~2.512) and (-0.5, 0.25) (kept)
    d1 = torch.tensor([2.5, -0.25])
    expected = torch.tensor([0.5, 0.25]) + (d1 / d1.norm() + torch.tensor([-0.5, 0.25])) / 2
    assert torch.allclose(agg.update(u, state)[0], expected, atol=1e-6)


def bulyan_reference(x: np.ndarray, f: int) -> np.ndarray:
    """El Mhamdi et al.'s Bulyan written directly on the vectors."""
    left, chosen = list(range(len(x))), []
    while len(chosen) < len(x) - 2 * f:
        pts = x[left]
        d = ((pts[:, None] - pts[None]) ** 2).sum(-1)
        np.fill_diagonal(d, np.inf)
        scores = np.sort(d, axis=1)[:, : max(len(left) - f - 2, 1)].sum(1)
        chosen.append(left.pop(int(np.argmin(scores))))
    s = x[sorted(chosen)]
    beta = len(x) - 4 * f
    gap = np.abs(s - np.median(s, axis=0))
    idx = np.argsort(gap, axis=0, kind="stable")[:beta]
    return np.take_along_axis(s, idx, 0).mean(0)


def test_bulyan_matches_direct_implementation():
    u = random_updates(11, 30, seed=3)
    got = run(bulyan(f=2), u)[0].numpy()
    assert np.allclose(got, bulyan_reference(u.deltas.double().numpy(), 2), atol=1e-6)


def flag_reference(g: np.ndarray, m: int, iterations: int) -> np.ndarray:
    """FA in P-space (lambda = 0): IRLS on eigenvectors of X W X^T, output (1/m) Y Y^T sum x."""
    x = (g / np.linalg.norm(g, axis=1, keepdims=True)).T  # P x K
    w = np.ones(x.shape[1])
    best_y, best_e = None, np.inf
    for _ in range(iterations):
        y = np.linalg.eigh(x @ np.diag(w) @ x.T)[1][:, -m:]
        r = np.abs(1 - ((y.T @ x) ** 2).sum(0))
        e = np.sqrt(np.clip(1 - ((y.T @ x) ** 2).sum(0), 0, None)).sum()
        if e >= best_e - 1e-10:
            break
        best_y, best_e = y, e
        w = 1 / np.sqrt(r + 1e-7)
    return best_y @ best_y.T @ x.sum(1) / m


def test_flag_matches_direct_p_space_irls():
    u = random_updates(6, 20, seed=4)
    got = run(flag_aggregator(subspace_dim=2, iterations=4, scale="none"), u)[0].numpy()
    assert np.allclose(got, flag_reference(u.deltas.double().numpy(), 2, 4), atol=1e-5)


def test_flag_gives_back_identical_updates():
    u = updates([[1.0, -2.0, 0.5]] * 4, [1] * 4)
    assert torch.allclose(run(flag_aggregator(), u)[0], u.deltas[0], atol=1e-6)


def test_clip_and_nnm_hand_worked():
    u = updates([[3.0, 4.0], [0.3, 0.4]], [1, 1])
    assert torch.allclose(run(clip_per_client(max_norm=1.0), u)[0].deltas,
                          torch.tensor([[0.6, 0.8], [0.3, 0.4]]))
    # 1-D 0, 1, 10 with f=1: each averages itself and its nearest neighbour.
    mixed = run(nnm(f=1), updates([[0.0], [1.0], [10.0]], [1, 1, 1]))[0].deltas
    assert torch.allclose(mixed, torch.tensor([[0.5], [0.5], [5.5]]))


def test_bucketing_keeps_totals_and_is_seeded():
    u = random_updates(7, 5)
    out = run(bucketing(bucket_size=2, seed=1), u)[0]
    assert out.num_clients == 4
    assert out.weights.sum() == u.weights.sum()
    assert torch.equal(out.client_ids, torch.sort(out.client_ids).values)
    # the size-weighted sum of bucket means is the sum of the updates
    sizes = torch.tensor([2.0, 2.0, 2.0, 2.0])
    sizes[out.client_ids == _odd_one_out(u, out)] = 1.0
    assert torch.allclose((out.deltas * sizes[:, None]).sum(0), u.deltas.sum(0), atol=1e-5)
    assert torch.equal(run(bucketing(bucket_size=2, seed=1), u)[0].deltas, out.deltas)
    assert not torch.equal(run(bucketing(bucket_size=2, seed=2), u)[0].deltas, out.deltas)
    # bucket size 1 only reorders, and rows come back ordered by id: nothing changes
    assert torch.equal(run(bucketing(bucket_size=1, seed=0), u)[0].deltas, u.deltas)


def _odd_one_out(u, out):
    """The id of the one-member bucket: its mean is one of the original rows."""
    for cid, row in zip(out.client_ids, out.deltas, strict=True):
        if any(torch.allclose(row, d) for d in u.deltas):
            return cid
    raise AssertionError("no single-member bucket")


@pytest.mark.parametrize("rule", [coordinate_median, trimmed_mean, krum, geometric_median,
                                  bulyan, flag_aggregator, centered_clipping])
def test_chunking_changes_nothing_but_rounding(rule):
    """Rules give the same answer with 1 chunk or many (bits may differ in the Gram sums)."""
    u = random_updates(11, 50, seed=5)
    whole = run(rule(), u)[0]
    with parallel.chunk_map(parallel.serial_map, chunk_columns=7):
        chunked = run(rule(), u)[0]
    assert torch.allclose(whole, chunked, atol=1e-5)


def _float64_updates(k: int, p: int, seed: int, ids=None):
    g = torch.Generator().manual_seed(seed)
    deltas = torch.randn(k, p, generator=g, dtype=torch.float64)
    u = updates(deltas.tolist(), torch.randint(1, 50, (k,), generator=g).tolist(), ids)
    return u._replace(deltas=deltas, fisher=deltas.square() + 0.01)


def krum_reference(x: np.ndarray, f: int, m: int, ids: np.ndarray) -> np.ndarray:
    """(Multi-)Krum on the vectors in float64: scores from direct squared distances, ties to
    the lower client id."""
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    scores = np.sort(d, axis=1)[:, : max(len(x) - f - 2, 1)].sum(1)
    order = np.lexsort((ids, scores))
    return x[order[:m]].mean(0)


def weiszfeld_reference(x: np.ndarray, a: np.ndarray, iterations: int, nu: float):
    a = a / a.sum()
    z = a @ x
    for _ in range(iterations):
        b = a / np.maximum(nu, np.linalg.norm(x - z, axis=1))
        z = (b / b.sum()) @ x
    return z


def test_reductions_compute_in_their_inputs_dtype_and_match_float64_references():
    """Every reduction returns float64 for float64 input, and independent float64 references
    (the rules written directly on the vectors) match to 1e-12."""
    u = _float64_updates(11, 30, seed=5)
    x, ids = u.deltas.numpy(), u.client_ids.numpy()
    a = u.weights.double().numpy()
    for agg, reference in [
            (krum(f=2), krum_reference(x, 2, 1, ids)),
            (multi_krum(f=2, m=4), krum_reference(x, 2, 4, ids)),
            (bulyan(f=2), bulyan_reference(x, 2)),
            (geometric_median(iterations=12, nu=1e-9), weiszfeld_reference(x, a, 12, 1e-9)),
            (coordinate_median(), np.median(x, axis=0)),
            (trimmed_mean(trim=0.2), scipy.stats.trim_mean(x, 0.2, axis=0))]:
        got = run(agg, u)[0]
        assert got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), reference, rtol=0, atol=1e-12)
    for agg in (centered_clipping(tau=1.0), flag_aggregator()):
        out = agg.update(u, agg.init(torch.zeros(30, dtype=torch.float64)))[0]
        assert out.dtype == torch.float64
    from policies.weighting import fisher_merge

    fisher = u.fisher.numpy()
    c = a / np.linalg.norm(fisher, axis=1)
    coef = c[:, None] * np.maximum(fisher, 1e-6)
    got = run(fisher_merge(), u)[0]
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), (coef * x).sum(0) / coef.sum(0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_exact_ties_go_to_the_lower_client_id_in_any_row_order(seed):
    """Two clients send the same update (an exact tie in every score); Krum picks the lower
    id of the two whatever the row order, and Multi-Krum and Bulyan select the same set."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(7, 6))
    base[4] = base[1]  # an exact duplicate: the best-scored pair, tied
    base[[0, 2, 3, 5, 6]] *= 4.0  # the others far apart
    ids = rng.permutation(np.arange(100, 107))
    tied = sorted([ids[1], ids[4]])
    for _ in range(4):
        order = rng.permutation(7)
        u = updates(base[order].tolist(), [1] * 7, ids[order].tolist())
        picked = run(krum(f=1), u)[0].numpy()
        np.testing.assert_array_equal(picked, base[1].astype(np.float32))
        g = parallel.gram(u.deltas)
        assert torch.equal(g, g.T)
        scores = krum_scores(parallel.squared_distances(g), 1)
        best = rank(scores, u.client_ids)[0]
        assert int(u.client_ids[best]) == tied[0]
        assert torch.equal(run(bulyan(f=1), u)[0],
                           run(bulyan(f=1), updates(base.tolist(), [1] * 7, ids.tolist()))[0])


def test_an_asymmetric_gram_chunk_is_made_symmetric(monkeypatch):
    """A BLAS may compute G_ij and G_ji in different orders; gram() returns (G + G^T) / 2,
    exactly symmetric, so the distances and Krum's ties do not depend on it."""
    def skewed(chunk):
        c = chunk.double()
        g = c @ c.T
        return g + torch.triu(torch.full_like(g, 1e-13), diagonal=1)

    monkeypatch.setattr(parallel, "_chunk_gram", skewed)
    x = torch.randn(6, 40, dtype=torch.float64)
    g = parallel.gram(x)
    assert torch.equal(g, g.T)
    d = parallel.squared_distances(g)
    assert torch.equal(d, d.T)

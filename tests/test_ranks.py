"""Rank aggregation (policies/ranks.py): hand-worked Borda, FRL and Kendall examples, Kemeny
against brute force, Bradley-Terry against closed forms and planted strengths, and one
contract checker over every registered aggregator."""

import pickle

import numpy as np
import pytest

from engine.core.errors import ConfigError
from policies.ranks import (
    RANKING,
    borda,
    bradley_terry,
    bradley_terry_from_comparisons,
    bradley_terry_mm,
    frl_client_ranking,
    frl_top_k_mask,
    frl_vote,
    items_best_first,
    kemeny,
    kemeny_exact,
    kendall_tau_distance,
    local_kemenization,
    pairwise_wins,
    ranking_from_scores,
    total_kendall_distance,
)

# Items A, B, C, D = 0, 1, 2, 3; rows are rank positions (0 = best).
THREE_VOTERS = np.array([
    [0, 1, 2, 3],  # A > B > C > D
    [2, 0, 1, 3],  # B > C > A > D
    [1, 3, 0, 2],  # C > A > D > B
])


def random_rankings(k, m, seed):
    g = np.random.default_rng(seed)
    return np.array([g.permutation(m) for _ in range(k)], dtype=np.int64)


def noisy_rankings(k, m, swaps, seed):
    """Each client: the planted order 0 > 1 > ... > M-1 with `swaps` random adjacent swaps."""
    g = np.random.default_rng(seed)
    rows = []
    for _ in range(k):
        order = np.arange(m)
        for p in g.integers(0, m - 1, size=swaps):
            order[[p, p + 1]] = order[[p + 1, p]]
        rows.append(np.argsort(order))
    return np.array(rows, dtype=np.int64)


# ---------------------------------------------------------------- Borda


def test_borda_hand_worked():
    # Scores M-1-position = 3-position per voter:
    # A: 3+1+2 = 6, B: 2+3+0 = 5, C: 1+2+3 = 6, D: 0+0+1 = 1 (total 3 voters * 6 = 18).
    # A and C tie at 6: the lower index (A) goes first. Order A, C, B, D.
    result = borda()(THREE_VOTERS)
    assert result.scores.tolist() == [6.0, 5.0, 6.0, 1.0]
    assert result.ranking.tolist() == [0, 2, 1, 3]
    assert result.ranking.dtype == np.int64


def test_pairwise_wins_hand_worked_and_row_sums_are_borda():
    # wins[i, j] = voters putting i above j, read off the three rows above.
    expected = [[0, 2, 1, 3],
                [1, 0, 2, 2],
                [2, 1, 0, 3],
                [0, 1, 0, 0]]
    wins = pairwise_wins(THREE_VOTERS)
    assert wins.tolist() == expected
    assert wins.sum(axis=1).tolist() == borda()(THREE_VOTERS).scores.tolist()
    r = random_rankings(9, 6, seed=3)
    w = pairwise_wins(r)
    assert (w + w.T == 9 * (1 - np.eye(6, dtype=np.int64))).all()


# ---------------------------------------------------------------- Kendall and Kemeny


def test_kendall_tau_distance_hand_worked():
    assert kendall_tau_distance([0, 1, 2, 3], [0, 1, 2, 3]) == 0
    assert kendall_tau_distance([0, 1, 2, 3], [1, 0, 2, 3]) == 1
    assert kendall_tau_distance([0, 1, 2, 3], [3, 2, 1, 0]) == 6  # every pair
    # Borda's A,C,B,D vs voter 2's B,C,A,D: pairs (A,B), (A,C), (B,C) differ; D agrees.
    assert kendall_tau_distance([0, 2, 1, 3], [2, 0, 1, 3]) == 3
    # against an O(M^2) count on random permutations
    g = np.random.default_rng(0)
    for _ in range(20):
        a, b = g.permutation(9), g.permutation(9)
        pairs = sum((a[i] < a[j]) != (b[i] < b[j]) for i in range(9) for j in range(i + 1, 9))
        assert kendall_tau_distance(a, b) == pairs


def test_kemeny_hand_worked_cycle():
    # Majorities A>B (2-1), B>C (2-1), C>A (2-1): a cycle, so no Condorcet order.
    # Total distances: Borda's A,C,B,D = 2+1+0+2+0+1 = 6; A,B,C,D = 1+2+0+1+1+0 = 5, and so are
    # its rotations B,C,A,D and C,A,B,D, the three optima. Brute force keeps the
    # lexicographically first (A,B,C,D).
    assert total_kendall_distance([0, 2, 1, 3], THREE_VOTERS) == 6
    for optimum in ([0, 1, 2, 3], [2, 0, 1, 3], [1, 2, 0, 3]):
        assert total_kendall_distance(optimum, THREE_VOTERS) == 5
    assert kemeny_exact(THREE_VOTERS).ranking.tolist() == [0, 1, 2, 3]
    got = kemeny()(THREE_VOTERS).ranking
    assert total_kendall_distance(got, THREE_VOTERS) == 5


def test_local_kemenization_fixes_borda_against_a_condorcet_winner():
    # 3 voters A>B>C, 2 voters B>C>A: A beats B and C 3-2 and B beats C 5-0, so A>B>C is the
    # Condorcet order, but Borda (A 6, B 7, C 2) puts B first.
    r = np.array([[0, 1, 2]] * 3 + [[2, 0, 1]] * 2)
    start = borda()(r).ranking
    assert start.tolist() == [1, 0, 2]
    order = local_kemenization(items_best_first(start), pairwise_wins(r))
    assert order.tolist() == [0, 1, 2]
    assert kemeny()(r).ranking.tolist() == [0, 1, 2]
    assert kemeny_exact(r).ranking.tolist() == [0, 1, 2]


def condorcet_ranking(rankings):
    """The rank positions of the Condorcet order if the strict pairwise majority is a total
    order (Copeland wins 0..M-1, all distinct), else None."""
    wins = pairwise_wins(rankings)
    beats = wins > wins.T
    copeland = beats.sum(axis=1)
    if sorted(copeland.tolist()) != list(range(len(copeland))):
        return None
    return ranking_from_scores(copeland)


@pytest.mark.parametrize("m", [4, 5, 6, 7])
def test_kemeny_matches_brute_force_on_condorcet_instances_and_never_loses_to_borda(m):
    condorcet_cases = 0
    for seed in range(25):
        k = 5 + 2 * (seed % 3)  # odd: no majority ties
        r = noisy_rankings(k, m, swaps=m, seed=1000 * m + seed)
        approx = total_kendall_distance(kemeny()(r).ranking, r)
        exact = kemeny_exact(r)
        optimum = total_kendall_distance(exact.ranking, r)
        assert optimum <= approx <= total_kendall_distance(borda()(r).ranking, r)
        assert approx <= 2 * optimum
        condorcet = condorcet_ranking(r)
        if condorcet is not None:
            condorcet_cases += 1
            assert kemeny()(r).ranking.tolist() == condorcet.tolist()
            assert exact.ranking.tolist() == condorcet.tolist()
    assert condorcet_cases >= 5  # the exact-match branch really ran


def test_kemeny_result_has_no_improving_single_item_move():
    # Local optimality against every move of one item to another position (adjacent swaps
    # included), checked by recomputing the objective from scratch.
    for seed in range(10):
        r = random_rankings(6, 10, seed=seed)
        order = items_best_first(kemeny()(r).ranking)
        best = total_kendall_distance(np.argsort(order), r)
        for p in range(10):
            for q in range(10):
                moved = np.insert(np.delete(order, p), q, order[p])
                assert total_kendall_distance(np.argsort(moved), r) >= best


def test_kemeny_exact_refuses_large_m():
    with pytest.raises(ConfigError, match=r"ranking.kemeny_exact.rankings: M=8"):
        kemeny_exact(random_rankings(3, 8, seed=0))


def test_kemeny_max_moves_zero_returns_the_start():
    # Borda (distance 6) loses to voters 1 and 2 (A,B,C,D and B,C,A,D: distance 5 each; voter 3
    # has 6). Of the tied client rankings the lexicographically smaller row [0, 1, 2, 3] is the
    # start, whatever the order of the clients.
    assert kemeny(max_moves=0)(THREE_VOTERS).ranking.tolist() == [0, 1, 2, 3]
    assert kemeny(max_moves=0)(THREE_VOTERS[::-1]).ranking.tolist() == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match=r"ranking.kemeny.max_moves"):
        kemeny(max_moves=-1)


# ---------------------------------------------------------------- Bradley-Terry


def test_bradley_terry_two_items_closed_form():
    wins = np.array([[0, 7], [3, 0]])
    assert np.allclose(bradley_terry_mm(wins, pseudo_count=0.0), [0.7, 0.3], atol=1e-9)
    # With a pseudo-count c on each ordered pair: p = (w12 + c) / (w12 + w21 + 2c).
    assert np.allclose(bradley_terry_mm(wins, pseudo_count=0.5), [7.5 / 11, 3.5 / 11],
                       atol=1e-9)
    result = bradley_terry_from_comparisons(wins.T)
    assert result.ranking.tolist() == [1, 0]
    assert result.scores.sum() == pytest.approx(1.0)


def test_bradley_terry_recovers_planted_strengths():
    s = np.array([0.4, 0.3, 0.2, 0.1])
    p = s[:, None] / (s[:, None] + s[None, :])
    # Expected counts satisfy the likelihood equations exactly at s.
    expected = 1e6 * p
    np.fill_diagonal(expected, 0)
    assert np.allclose(bradley_terry_mm(expected, pseudo_count=0.0), s, atol=1e-8)
    assert np.allclose(bradley_terry_mm(expected), s, atol=1e-6)  # default pseudo-count
    # Sampled counts: 20000 games per pair.
    g = np.random.default_rng(0)
    upper = g.binomial(20000, np.triu(p, 1))
    sampled = upper + np.tril(20000 - upper.T, -1)
    got = bradley_terry_from_comparisons(sampled)
    assert np.allclose(got.scores, s, atol=0.01)
    assert got.ranking.tolist() == [0, 1, 2, 3]


def test_bradley_terry_from_plackett_luce_rankings():
    # Under Plackett-Luce, P(i ranked above j) = s_i / (s_i + s_j): the pairwise results of
    # sampled rankings follow Bradley-Terry with the same strengths.
    s = np.array([0.1, 0.4, 0.2, 0.3])
    g = np.random.default_rng(1)
    keys = np.log(s) + g.gumbel(size=(20000, 4))  # Gumbel-max sampling of Plackett-Luce
    rankings = ranking_from_scores(keys)
    got = bradley_terry()(rankings)
    assert np.allclose(got.scores, s, atol=0.01)
    assert got.ranking.tolist() == [3, 0, 2, 1]


def test_bradley_terry_keeps_exact_ties():
    # Items 1 and 3 (and 0 and 4) meet the same win counts in different orders, so their
    # strengths are equal and the lower index goes first; a plain float sum over each row
    # would make them differ in the last bit and rank 3 above 1.
    r = np.array([[1, 0, 2, 3, 4], [2, 1, 0, 4, 3], [2, 3, 4, 0, 1], [4, 3, 2, 0, 1]])
    wins = np.sort(pairwise_wins(r), axis=1)
    assert (wins[1] == wins[3]).all() and (wins[0] == wins[4]).all()
    result = bradley_terry()(r)
    assert result.scores[1] == result.scores[3] and result.scores[0] == result.scores[4]
    assert result.ranking.tolist() == [3, 0, 2, 1, 4]


def test_bradley_terry_needs_strong_connectivity_without_pseudo_count():
    with pytest.raises(ConfigError, match=r"ranking.bradley_terry.pseudo_count: the comp"):
        bradley_terry_mm(np.array([[0, 4], [0, 0]]), pseudo_count=0.0)
    with pytest.raises(ConfigError, match=r"ranking.bradley_terry.pseudo_count: must be"):
        bradley_terry(pseudo_count=-1.0)
    with pytest.raises(ConfigError, match=r"ranking.bradley_terry.comparisons"):
        bradley_terry_mm(np.array([[0, -1], [2, 0]]))


# ---------------------------------------------------------------- FRL


def test_frl_vote_hand_worked():
    edge_scores = np.array([
        [0.9, 0.1, 0.5, 0.3, 0.7],  # positions [0, 4, 2, 3, 1] -> FRL index 4-p: [4, 0, 2, 1, 3]
        [0.2, 0.8, 0.6, 0.4, 0.0],  # positions [3, 0, 1, 2, 4] -> FRL index [1, 4, 3, 2, 0]
        [0.6, 0.2, 0.9, 0.1, 0.4],  # positions [1, 3, 0, 4, 2] -> FRL index [3, 1, 4, 0, 2]
    ])
    rankings = frl_client_ranking(edge_scores)
    assert rankings.tolist() == [[0, 4, 2, 3, 1], [3, 0, 1, 2, 4], [1, 3, 0, 4, 2]]
    # Reputations (sum of FRL indices, higher = more important): [8, 5, 9, 3, 5].
    # Order 2, 0, then 1 and 4 tie at 5 (lower index first), then 3.
    result = frl_vote()(rankings)
    assert result.scores.tolist() == [8.0, 5.0, 9.0, 3.0, 5.0]
    assert result.ranking.tolist() == [1, 2, 0, 4, 3]
    assert frl_top_k_mask(result.ranking, 2).tolist() == [True, False, True, False, False]
    assert frl_top_k_mask(result.ranking, 3).tolist() == [True, True, True, False, False]
    assert not frl_top_k_mask(result.ranking, 0).any()
    with pytest.raises(ConfigError, match=r"ranking.frl_top_k_mask.k: must be an integer"):
        frl_top_k_mask(result.ranking, 6)


def test_frl_vote_is_a_borda_count():
    r = random_rankings(11, 30, seed=5)
    assert np.array_equal(frl_vote()(r).scores, borda()(r).scores)
    assert np.array_equal(frl_vote()(r).ranking, borda()(r).ranking)


def planted_votes(num_honest, num_poisoned, m, seed):
    """Honest clients rank noisy scores of a planted quality (a random order of 0..M-1, the
    best 10 lifted by a margin of 10); poisoned clients send the exact reverse of the planted
    ranking."""
    g = np.random.default_rng(seed)
    quality = g.permutation(m).astype(float)  # higher = better
    quality[quality >= m - 10] += 10.0
    honest = frl_client_ranking(quality + g.normal(0, 3.0, size=(num_honest, m)))
    reversed_ = np.tile(frl_client_ranking(-quality), (num_poisoned, 1))
    planted_top = quality >= m
    return np.concatenate([honest, reversed_]), planted_top


def test_frl_vote_top_k_survives_a_poisoned_minority():
    # 16 honest + 4 reversed (20%) clients over 100 edges: the top-10 subnetwork is the planted
    # one. Control: with 12 of 20 clients reversed it is not (the test can fail).
    votes, planted_top = planted_votes(16, 4, 100, seed=0)
    mask = frl_top_k_mask(frl_vote()(votes).ranking, 10)
    assert mask.tolist() == planted_top.tolist()
    votes, planted_top = planted_votes(8, 12, 100, seed=0)
    mask = frl_top_k_mask(frl_vote()(votes).ranking, 10)
    assert not (mask & planted_top).any()


# ---------------------------------------------------------------- contract over RANKING


@pytest.mark.parametrize("name", sorted(RANKING))
def test_ranking_contract(name):
    aggregate = RANKING[name]()
    for k, m, seed in [(7, 6, 0), (4, 9, 1), (1, 5, 2), (3, 1, 3)]:
        r = random_rankings(k, m, seed)
        result = aggregate(r)
        assert result.ranking.dtype == np.int64 and result.ranking.shape == (m,)
        assert sorted(result.ranking.tolist()) == list(range(m))  # a permutation
        assert result.scores.dtype == np.float64 and result.scores.shape == (m,)
        assert np.array_equal(ranking_from_scores(result.scores), result.ranking)
        again = aggregate(r.copy())  # deterministic
        assert np.array_equal(again.ranking, result.ranking)
        assert np.array_equal(again.scores, result.scores)
        shuffled = aggregate(r[np.random.default_rng(seed).permutation(k)])
        assert np.array_equal(shuffled.ranking, result.ranking)  # order of clients
        assert np.array_equal(shuffled.scores, result.scores)
        if k == 1:  # one client: its ranking is the consensus
            assert np.array_equal(result.ranking, r[0])
    restored = pickle.loads(pickle.dumps(aggregate))  # ships into a Ray task
    r = random_rankings(5, 6, seed=9)
    assert np.array_equal(restored(r).ranking, aggregate(r).ranking)
    assert np.array_equal(restored(r).scores, aggregate(r).scores)


@pytest.mark.parametrize("name", sorted(RANKING))
def test_ranking_ties_go_to_the_lower_index(name):
    # Two opposite voters: every item is equally good, so the consensus is 0, 1, 2, 3.
    r = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    assert RANKING[name]()(r).ranking.tolist() == [0, 1, 2, 3]
    assert RANKING[name]()(r[::-1]).ranking.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("name", sorted(RANKING))
def test_ranking_rejects_bad_input(name):
    aggregate = RANKING[name]()
    with pytest.raises(ConfigError, match=rf"^ranking.{name}.rankings: row 1 is not a perm"):
        aggregate(np.array([[0, 1, 2], [0, 0, 2]]))
    with pytest.raises(ConfigError, match=rf"^ranking.{name}.rankings: expected a non-empty"):
        aggregate(np.zeros((0, 3), dtype=np.int64))
    with pytest.raises(ConfigError, match=rf"^ranking.{name}.rankings: expected integer"):
        aggregate(np.array([[0.0, 1.0]]))


def make_ranking(name: str, **params):
    return RANKING.make(name, "ranking", **params)


def test_the_registry_validates_names_and_parameters():
    assert make_ranking("kemeny", max_moves=3)(THREE_VOTERS).ranking.dtype == np.int64
    with pytest.raises(ConfigError,
                       match=r"^ranking.kind: unknown rank aggregator 'copeland'; allowed"):
        make_ranking("copeland")
    with pytest.raises(ConfigError, match=r"^ranking.weights: rank aggregator 'borda' takes no"):
        make_ranking("borda", weights=[1, 2])
    with pytest.raises(ConfigError, match=r"^ranking.bradley_terry.max_iter: must be >= 1"):
        make_ranking("bradley_terry", max_iter=0)
    with pytest.raises(ConfigError, match=r"^ranking.tol: Input should be"):
        make_ranking("bradley_terry", tol="small")

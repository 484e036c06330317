import numpy as np

from engine.core.seeds import SeedTree, keyed_permutations


def test_rows_are_permutations_then_padding():
    keys = SeedTree(1).client_keys("shuffle", 0, np.arange(5))
    counts = np.array([1, 3, 7, 16, 2])
    perms = keyed_permutations(keys, counts, width=16)
    for row, n in zip(perms, counts, strict=True):
        assert sorted(row[:n]) == list(range(n))
        assert (row[n:] == -1).all()


def test_a_client_draw_depends_only_on_its_key_and_count():
    tree = SeedTree(3)
    ids = np.array([4, 9, 11])
    together = keyed_permutations(tree.client_keys("s", 2, ids), np.array([5, 9, 6]), 12)
    alone = keyed_permutations(tree.client_keys("s", 2, ids[1:2]), np.array([9]), 9)
    assert (together[1, :9] == alone[0]).all()


def test_streams_rounds_and_seeds_are_independent():
    a = SeedTree(0).client_keys("shuffle", 0, np.arange(4))
    assert len(set(a.tolist())) == 4
    assert not (a == SeedTree(0).client_keys("shuffle", 1, np.arange(4))).any()
    assert not (a == SeedTree(1).client_keys("shuffle", 0, np.arange(4))).any()
    assert not (a == SeedTree(0).client_keys("other", 0, np.arange(4))).any()
    assert (a == SeedTree(0).client_keys("shuffle", 0, np.arange(4))).all()


def test_permutations_are_uniform_enough():
    # position of element 0 over many keys: ~uniform over 4 positions
    keys = SeedTree(5).client_keys("u", 0, np.arange(4000))
    perms = keyed_permutations(keys, np.full(4000, 4), 4)
    counts = np.bincount(np.argmax(perms == 0, axis=1), minlength=4)
    assert np.all(np.abs(counts - 1000) < 4 * np.sqrt(1000 * 0.75))

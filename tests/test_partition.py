import numpy as np
import pytest

from engine.core.errors import ConfigError
from scenarios.datasets import DATASETS, holdout_mask, whole
from scenarios.partition import PARTITIONS, partition

LABELS = np.random.default_rng(0).integers(0, 10, 1000)


PARAMS = {"dirichlet": {"alpha": 0.1}, "quantity": {"alpha": 0.1},
          "shards": {"shards_per_client": 2}}


@pytest.mark.parametrize("kind", [k for k in PARTITIONS.names() if k != "natural"])
def test_every_sample_owned_and_every_client_nonempty(kind):
    owner = partition(LABELS, 50, PARTITIONS.make(kind, **PARAMS.get(kind, {})),
                      np.random.default_rng(1))
    assert owner.shape == LABELS.shape
    assert np.bincount(owner, minlength=50).min() >= 1
    assert owner.max() == 49


def test_iid_sizes_are_equal_within_one():
    owner = partition(LABELS, 30, PARTITIONS.make("iid"), np.random.default_rng(0))
    sizes = np.bincount(owner)
    assert sizes.max() - sizes.min() <= 1


def test_shards_give_each_client_few_labels():
    owner = partition(LABELS, 50, PARTITIONS.make("shards", shards_per_client=2),
                      np.random.default_rng(0))
    labels_per_client = [np.unique(LABELS[owner == c]).size for c in range(50)]
    assert max(labels_per_client) <= 4  # 2 shards of sorted labels, each spanning <= 2 labels


def test_dirichlet_skew_grows_as_alpha_shrinks():
    def mean_labels(alpha):
        owner = partition(LABELS, 20, PARTITIONS.make("dirichlet", alpha=alpha),
                          np.random.default_rng(0))
        return np.mean([np.unique(LABELS[owner == c]).size for c in range(20)])

    assert mean_labels(0.05) < mean_labels(100.0) - 3


def test_too_many_clients_is_a_config_error():
    with pytest.raises(ConfigError, match="num_clients: 2000 exceeds the 1000 training samples"):
        partition(LABELS, 2000, PARTITIONS.make("iid"), np.random.default_rng(0))


def test_natural_needs_a_per_client_dataset():
    with pytest.raises(ConfigError, match="natural"):
        partition(LABELS, 10, PARTITIONS.make("natural"), np.random.default_rng(0))


def test_synthetic_is_non_iid_per_client():
    source = DATASETS.make("synthetic", alpha=1.0, beta=1.0, samples_per_client=200)
    x, y, owner, _, _ = whole(source(10, np.random.default_rng(0)))
    assert x.shape == (2000, 60) and x.dtype == np.float32
    assert (np.bincount(owner) == 200).all()
    means = np.stack([x[owner == c].mean(axis=0) for c in range(10)])
    assert means[:, 0].std() > 0.5  # clients' input means differ (beta > 0)


def test_synthetic_beta_is_a_standard_deviation():
    """v_k ~ N(B_k, 1), B_k ~ N(0, beta): the spread of client input means is sqrt(beta^2 + 1)
    (FedProx's generator reads beta as a standard deviation, not a variance)."""
    source = DATASETS.make("synthetic", alpha=0.0, beta=3.0, samples_per_client=2,
                           num_features=200)
    x, _, owner, _, _ = whole(source(2000, np.random.default_rng(0)))
    first_feature_mean = np.array([x[owner == c, 0].mean() for c in range(2000)])
    # feature 0 has unit noise; client means spread like N(0, beta^2 + 1 + 1/2)
    assert abs(first_feature_mean.std() - np.sqrt(9 + 1 + 0.5)) < 0.25


def test_holdout_keeps_a_training_sample_per_client():
    owner = np.repeat(np.arange(5), [1, 2, 10, 10, 50])
    mask = holdout_mask(owner.size, 0.5, owner, np.random.default_rng(0))
    assert [int((~mask[owner == c]).sum()) for c in range(5)] == [1, 1, 5, 5, 25]


def test_digits_split_and_scale(tmp_path):
    from engine.core.seeds import SeedTree
    from scenarios.partition import PARTITIONS
    from scenarios.store import ClientStore, open_store, write_store

    seeds = SeedTree(0)
    write_store(tmp_path, DATASETS.make("digits")(10, seeds.rng("data")), 10,
                PARTITIONS.make("iid"), seeds, seeds.rng("data"), 0.2, 10_000)
    store: ClientStore = open_store(tmp_path)
    x_test, y_test = store.split("test")
    assert store.sizes.sum() + len(y_test) == 1797
    assert abs(len(y_test) - 359) <= 1
    x, _ = store.open().read(np.array([0]), np.array([store.sizes.sum()]))
    assert x.min() >= 0.0 and x.max() <= 1.0 and x_test.max() <= 1.0

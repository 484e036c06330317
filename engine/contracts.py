"""Contract checkers, one per registry: what every plugin of a kind must do.

Each `check_<kind>(plugin, remote=...)` runs a plugin (built, with its parameters bound) on
small inputs of the right shape and raises AssertionError naming what it broke: output shapes
and dtypes, finite values, the same bits twice (determinism), the same bits when run inside
another process (`remote`: a real Ray task in the project's tests; by default the plugin goes
through cloudpickle, as Ray would ship it), and permutation invariance where the plugin
declares it. `CHECKERS` maps each registry's name to (registry, checker); tests/test_contracts.py
runs them over every registered entry, and an out-of-tree plugin's author runs the same:

    from engine.contracts import check
    check("aggregation", "my_package.rules:my_rule")                  # by name, or
    check("topology", "my_package.graphs:my_graph", {"degree": 3})     # with parameters
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from ray import cloudpickle

from engine.compute.training import EXECUTORS, LocalSGD, batch_plan
from engine.core import tree
from engine.core.neighbourhood import Evidence, Neighbourhood
from engine.core.params import ParamSpec, init_params
from engine.core.plans import Dispatch
from engine.core.plugins import Registry
from engine.core.seeds import SeedTree
from engine.core.tree import TreeSums
from engine.core.updates import Updates
from policies.asynchronous import SERVER_RULES, ServerRule
from policies.base import chain
from policies.compression import COMPRESSORS, Compressor
from policies.consensus import Consensus
from policies.ranks import RANKING
from policies.registry import AGGREGATION, CONSENSUS
from policies.selection import SELECTION, Selection
from policies.staleness import STALENESS
from scenarios.adversaries import ATTACKS, Attack
from scenarios.availability import AVAILABILITY, Availability
from scenarios.datasets import DATASETS, whole
from scenarios.distributions import DISTRIBUTIONS, Distribution
from scenarios.environments import Environments
from scenarios.mixing import MIXING, column_stochastic
from scenarios.models import MODELS, ModelSpec
from scenarios.partition import PARTITIONS
from scenarios.platforms import PLATFORMS, Platform
from scenarios.topology import TOPOLOGIES, Graph, ring

Remote = Callable[..., Any]  # remote(fn, *args) -> fn(*args), run in another process


def pickled(fn: Callable, *args: Any) -> Any:
    """fn(*args) after both went through cloudpickle, as Ray ships a task."""
    fn, args = cloudpickle.loads(cloudpickle.dumps((fn, args)))
    return fn(*args)


def _same(a: Any, b: Any, what: str) -> None:
    """Bitwise equality of tensors, arrays, sequences and scalars."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), what
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=what)
    elif isinstance(a, tuple | list):
        assert len(a) == len(b), what
        for x, y in zip(a, b, strict=True):
            _same(x, y, what)
    else:
        assert a == b or (a != a and b != b), what  # NaN == NaN here


def _finite(x: torch.Tensor | np.ndarray, what: str) -> None:
    ok = torch.isfinite(x).all() if isinstance(x, torch.Tensor) else np.isfinite(x).all()
    assert bool(ok), f"{what}: not finite"


# ---------------------------------------------------------------- aggregation stages

POPULATION = 16


def sample_validation(params: torch.Tensor) -> float:
    """A stand-in for the engine's validation scorer (stages that need "validation"): higher
    nearer 0.25 in every coordinate."""
    return -float((params.double() - 0.25).square().sum())


def sample_updates(k: int = 7, p: int = 11, seed: int = 0) -> Updates:
    """K clients' updates with every per-client column a pool sends."""
    g = torch.Generator().manual_seed(seed)
    deltas = torch.randn(k, p, generator=g)
    n = torch.randint(1, 50, (k,), generator=g)
    ids = torch.arange(k)
    return Updates(deltas, n.float(), ids, deltas.abs().mean(dim=1), n, steps=n // 4 + 1,
                   label_counts=torch.stack([n, (ids * 7) % 5 + 1], dim=1),
                   fisher=deltas.square() + 0.01)


def complete_stage(factory: Callable, stage: Any) -> Any:
    """A stage as a whole aggregator (Updates -> step): a weighted mean around transforms
    and optimizers."""
    from policies.aggregation import weighted_mean

    kind = factory.stage_kind
    if kind == "optimizer":
        return chain(weighted_mean(), stage)
    if kind == "transform":
        return chain(stage, weighted_mean())
    return stage


def _stage_step(agg: Any, u: Updates) -> torch.Tensor:
    width = (u.deltas if u.deltas is not None else u.weighted_sums.sums).shape[1]
    state = agg.init(torch.zeros(width))
    step = None
    for _ in range(3):  # state threads through rounds
        step, state = agg.update(u, state)
    return step


def check_stage(factory: Callable, params: dict | None = None,
                remote: Remote = pickled) -> None:
    """Shapes, finiteness, determinism, purity, permutation invariance (unless the factory
    is `permutation_invariant=False`), the same bits in a Ray task, and for decomposable
    stages the same bits from partial sums as from every delta."""
    engine = {"num_clients": POPULATION, "seed": 1234, "validation": sample_validation}
    agg = complete_stage(factory, _built(AGGREGATION, factory, params, engine))
    u = sample_updates()
    before = [None if c is None else c.clone() for c in u.per_client()]
    step = _stage_step(agg, u)
    assert step.shape == (11,) and step.dtype == torch.float32, "step: [P] float32"
    _finite(step, "step")
    _same(step, _stage_step(agg, u), "the same updates twice give other bits")
    assert all(x is y is None or torch.equal(x, y)
               for x, y in zip(before, u.per_client(), strict=True)), "changed its input"
    if getattr(factory, "permutation_invariant", True):
        perm = torch.tensor([3, 6, 0, 5, 1, 4, 2])  # moves every row
        torch.testing.assert_close(_stage_step(agg, u.take(perm)), step, atol=1e-6, rtol=1e-6,
                                   msg="depends on the order of the clients")
    _same(remote(_stage_step, agg, u), step, "another process gives other bits")
    if getattr(factory, "decomposable", False):
        leaves = TreeSums.leaves(u.weights[:, None] * u.deltas, u.client_ids)
        parts = [tree.merge(TreeSums(*(c[lo:hi] for c in leaves)), lo, hi)
                 for lo, hi in [(0, 2), (2, 3), (3, 7)]]
        pre = u._replace(deltas=None, weighted_sums=TreeSums.concat(parts))
        _same(_stage_step(agg, pre), step, "partial sums give other bits than every delta")


def _built(registry: Registry, factory: Callable, params: dict | None,
           engine: dict | None = None) -> Any:
    """A factory (registered or not) built with checked parameters."""
    name = next((n for n in registry.names() if registry[n] is factory), None)
    if name is None:
        registry = Registry(registry.noun, {"plugin": factory}, runtime=registry.runtime,
                            engine=registry.engine)
        name = "plugin"
    return registry.build(registry.section(name, dict(params or {}), registry.noun,
                                           f"{registry.noun}.kind"), **(engine or {}))


# ---------------------------------------------------------------- consensus policies


def sample_neighbourhood(n: int = 6, p: int = 5, seed: int = 0) -> Neighbourhood:
    """A ring of n peers as one block, Metropolis-Hastings weights (doubly stochastic)."""
    from scenarios.mixing import metropolis_hastings

    w = metropolis_hastings(ring(n)).toarray().astype(np.float32)
    x = np.random.default_rng(seed).normal(size=(n, p)).astype(np.float32)
    index = torch.arange(n).expand(n, n).clone()
    valid = torch.from_numpy(w != 0) | torch.eye(n, dtype=torch.bool)
    return Neighbourhood(torch.from_numpy(x), torch.ones(n), index, torch.from_numpy(w),
                         valid, torch.arange(n), layers=((0, 3), (3, p)))


def _linear_logits(models: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A linear classifier [F, C] per row, flattened in `models` [n, F * C]: x @ W."""
    return torch.einsum("nbf,nfc->nbc", x, models.view(models.shape[0], x.shape[-1], -1))


def _with_policy_inputs(nb: Neighbourhood, policy: Consensus, seed: int = 0) -> Neighbourhood:
    """A judging policy's own-data batches (a linear 3-feature model on P = 6: 2 classes)
    and a stateful policy's first state rows."""
    n = nb.num_peers
    if policy.evidence:
        rng = np.random.default_rng(seed)
        x = torch.from_numpy(rng.normal(size=(n, policy.evidence, 3)).astype(np.float32))
        y = (x[..., 0] > 0).long()
        nb = nb._replace(evidence=Evidence(x, y, torch.ones(y.shape, dtype=torch.bool),
                                           _linear_logits), layers=((0, 4), (4, 6)))
    if policy.init_state is not None:
        nb = nb._replace(state=policy.init_state(n).double().expand(n, -1).clone())
    return nb._replace(ids=torch.arange(nb.models.shape[0]))


def check_consensus(factory: Callable, params: dict | None = None,
                    remote: Remote = pickled) -> None:
    """[n, P] models and [n] masses (and [n, S] state rows for a stateful policy), finite,
    deterministic, the same bits in a Ray task; a consensus (identical models) stays put;
    `mean_preserving` policies keep the mean."""
    policy: Consensus = _built(CONSENSUS, factory, params)
    nb = _with_policy_inputs(sample_neighbourhood(p=6), policy)
    out = policy.update(nb)
    models, mass = out[:2]
    assert models.shape == nb.models.shape and mass.shape == (nb.num_peers,), "shapes"
    assert (len(out) == 3) == (policy.init_state is not None), "state rows iff init_state"
    _finite(models, "models")
    _same(policy.update(nb), out, "the same neighbourhood twice gives other bits")
    _same(remote(policy.update, nb), out, "another process gives other bits")
    same = nb._replace(models=nb.models[:1].expand_as(nb.models).clone())
    torch.testing.assert_close(policy.update(same)[0], same.models, atol=1e-5, rtol=1e-5,
                               msg="moves peers that agree")
    if getattr(factory, "mean_preserving", False) and not factory.needs_column_stochastic:
        torch.testing.assert_close(models.mean(dim=0), nb.models.mean(dim=0), atol=1e-5,
                                   rtol=1e-5, msg="declared mean-preserving, moves the mean")


# ---------------------------------------------------------------- server rules


def _decide(rule: ServerRule, arrivals: list[Dispatch]) -> list[tuple[int, ...]]:
    """The batches a rule aggregates over a stream of arrivals (and a tick at the end)."""
    state, batches = rule.init(), []
    for i, d in enumerate(arrivals):
        state, steps, _ = rule.assign(state, d.client, float(i))
        decision = rule.arrive(state, d, float(i) + 0.5)
        state = decision.state
        batches.append(tuple(x.seq for x in decision.aggregate))
    final = rule.tick(state, float(len(arrivals)))
    return [*batches, tuple(x.seq for x in final.aggregate)]


def check_server_rule(factory: Callable, params: dict | None = None,
                      remote: Remote = pickled) -> None:
    """Decisions are pure of the state (the same stream, the same batches, in any process);
    a batch's Updates are keyed by dispatch number, sorted, with staleness and finite
    values; the scale is finite and >= 0."""
    rule: ServerRule = _built(SERVER_RULES, factory, params)
    if not rule.asynchronous:
        return
    arrivals = [Dispatch(i, i % 3, max(0, i - 2), float(i), 1.0, 4, "completed",
                         torch.full((4,), float(i)), 0.5, 10 + i) for i in range(12)]
    batches = _decide(rule, arrivals)
    _same(_decide(rule, arrivals), batches, "the same arrivals twice give other batches")
    _same(remote(_decide, rule, arrivals), batches, "another process decides otherwise")
    models = {v: torch.zeros(4) for v in range(13)}
    for batch in [b for b in batches if b]:
        chosen = tuple(arrivals[s] for s in batch)
        updates, scale = rule.updates(chosen, 12, models.__getitem__, 200.0)
        ids = updates.client_ids.tolist()
        assert ids == sorted(set(ids)) == sorted(batch), "rows keyed by sorted dispatch number"
        assert updates.staleness is not None and (updates.staleness >= 0).all(), "staleness"
        _finite(updates.deltas, "updates")
        assert math.isfinite(scale) and scale >= 0, "scale"


# ---------------------------------------------------------------- the world


def check_selection(factory: Callable, params: dict | None = None,
                    remote: Remote = pickled) -> None:
    """Sorted, distinct ids among the available; K of them (at least K when the round closes
    at the K-th report); the same ids for the same generator, in any process."""
    selection: Selection = _built(SELECTION, factory, params)
    available = np.array([1, 3, 4, 8, 9, 12, 15, 20, 21, 30])
    losses = np.linspace(0.0, 3.0, 31)

    def pick(seed: int) -> np.ndarray:
        return selection.choose(available, 4, losses, np.random.default_rng(seed))

    ids = pick(0)
    assert np.all(np.diff(ids) > 0) and np.isin(ids, available).all(), "sorted available ids"
    assert ids.size >= 4 if selection.closes_at_k else ids.size == 4, "K clients"
    _same(pick(0), ids, "the same generator gives other clients")
    _same(remote(pick, 0), ids, "another process picks other clients")
    assert selection.choose(available[:2], 4, losses, np.random.default_rng(0)).size <= 2


def check_availability(factory: Callable, params: dict | None = None,
                       remote: Remote = pickled) -> None:
    """bool [n] per slot, a function of (seed, slot) alone: the same mask asked in any order
    and in another process; own local steps, if any, are >= 1 online and 0 offline."""
    n = 40
    model: Availability = _built(AVAILABILITY, factory, params,
                                 {"num_clients": n, "seeds": SeedTree(3)})
    forward = [model.mask(t) for t in range(12)]
    assert all(m.dtype == bool and m.shape == (n,) for m in forward), "masks are bool [n]"
    backward = [model.mask(t) for t in reversed(range(12))][::-1]
    _same(backward, forward, "the mask of a slot depends on the order slots are asked in")
    _same(remote(lambda m: [m.mask(t) for t in range(12)], model), forward,
          "another process gives other masks")
    steps = model.local_steps(5)
    if steps is not None:
        assert np.all(steps[forward[5]] >= 1) and np.all(steps[~forward[5]] == 0), "steps"


def check_distribution(factory: Callable, params: dict | None = None,
                       remote: Remote = pickled) -> None:
    """float64 [n], finite, never below its declared `low`, the same for the same generator
    in any process."""
    dist: Distribution = _built(DISTRIBUTIONS, factory, params)

    def draw(seed: int) -> np.ndarray:
        return dist.draw(500, np.random.default_rng(seed))

    x = draw(0)
    assert x.dtype == np.float64 and x.shape == (500,), "float64 [n]"
    _finite(x, "draws")
    assert dist.low is None and x.min() > 0 or x.min() >= dist.low, "below its low"
    _same(draw(0), x, "the same generator draws other values")
    _same(remote(draw, 0), x, "another process draws other values")


def check_topology(factory: Callable, params: dict | None = None,
                   remote: Remote = pickled) -> None:
    """A Graph on n nodes with arcs between distinct nodes in range, symmetric when
    undirected, the same for the same generator in any process."""
    topology = _built(TOPOLOGIES, factory, params)

    def draw(seed: int) -> Graph:
        return topology(16, np.random.default_rng(seed))

    graph = draw(0)
    assert graph.num_nodes == 16, "n nodes"
    assert np.all((graph.src >= 0) & (graph.src < 16) & (graph.dst >= 0) & (graph.dst < 16))
    assert not np.any(graph.src == graph.dst), "self loops"
    if not graph.directed:
        arcs = set(zip(graph.src.tolist(), graph.dst.tolist(), strict=True))
        assert all((b, a) in arcs for a, b in arcs), "undirected: both directions"
    _same((draw(0).src, draw(0).dst), (graph.src, graph.dst), "the same generator, another graph")
    other = remote(draw, 0)
    _same((other.src, other.dst), (graph.src, graph.dst), "another process, another graph")


def check_mixing(factory: Callable, params: dict | None = None,
                 remote: Remote = pickled) -> None:
    """W [n, n] with non-negative weights whose rows (columns, for column-stochastic mixing)
    sum to 1, the same in any process."""
    mixing = _built(MIXING, factory, params)
    from scenarios.topology import random_regular

    graph = random_regular(12, np.random.default_rng(0), degree=3)
    w = mixing(graph).toarray()
    assert w.shape == (12, 12) and (w >= 0).all(), "non-negative [n, n]"
    axis = 0 if column_stochastic(mixing) else 1
    np.testing.assert_allclose(w.sum(axis=axis), 1.0, atol=1e-12, err_msg="stochastic")
    _same(remote(lambda m, g: m(g).toarray(), mixing, graph), w, "another process")


def check_partition(factory: Callable, params: dict | None = None,
                    remote: Remote = pickled) -> None:
    """An owner in [0, n) for every sample, every client owning one, the same for the same
    generator in any process."""
    partitioner = _built(PARTITIONS, factory, params)
    labels = np.random.default_rng(0).integers(0, 10, 600)
    natural = np.repeat(np.arange(20), 30)

    def split(seed: int) -> np.ndarray:
        return partitioner(labels, 20, np.random.default_rng(seed), natural)

    owner = split(0)
    assert owner.shape == labels.shape and owner.min() >= 0 and owner.max() < 20, "range"
    assert np.bincount(owner, minlength=20).min() >= 1, "a client owns nothing"
    _same(split(0), owner, "the same generator, another partition")
    _same(remote(split, 0), owner, "another process, another partition")


def check_dataset(factory: Callable, params: dict | None = None,
                  remote: Remote = pickled) -> None:
    """Flat float32 features of the declared shape, finite; int64 labels in range; natural
    owners, if any, one per sample; the same for the same generator in any process."""
    source = _built(DATASETS, factory, params)

    def load(seed: int):
        return source(8, np.random.default_rng(seed))

    drawn = load(0)
    if isinstance(drawn, Environments):
        return _check_environments(drawn, load, remote)
    x, y, owner, classes, shape = whole(drawn)  # a Stream's blocks joined
    assert x.dtype == np.float32 and x.ndim == 2 and x.shape[1] == int(np.prod(shape))
    _finite(x, "features")
    assert y.dtype == np.int64 and y.shape == (x.shape[0],) and 0 <= y.min() <= y.max() < classes
    assert owner is None or owner.shape == y.shape, "an owner per sample"
    _same(whole(load(0))[:2], (x, y), "the same generator, other samples")
    _same(remote(lambda seed: whole(load(seed)), 0)[:2], (x, y),
          "another process, other samples")


def _check_environments(drawn: Environments, load: Callable, remote: Remote) -> None:
    """An environment entry: finite physics for each of the 8 clients and the test set; a
    vector of them resets and steps to observations of the family's shape and finite
    rewards, the same for the same generators; the same physics in any process."""
    env = drawn.env
    for physics, n in ((env.physics, 8), (env.test_physics, None)):
        assert set(physics) == set(env.family.physics), "every physical parameter"
        for values in physics.values():
            assert values.ndim == 1 and (n is None or values.size == n), "one value per env"
            _finite(values, "physics")
    assert drawn.rollout_steps >= 1

    def episode(seed: int):
        envs = env.family.make(env.physics, [np.random.default_rng([seed, i]) for i in range(8)])
        obs, _ = envs.reset()
        out = [obs]
        for _ in range(20):
            obs, reward, terminated, truncated, _ = envs.step(np.zeros(8, dtype=np.int64))
            assert obs.shape == (8, env.family.obs_dim), "[envs, obs_dim] observations"
            _finite(reward, "rewards")
            out.append(obs)
        return np.stack(out)

    _same(episode(0), episode(0), "the same generators, another episode")
    def stacked(physics: dict) -> np.ndarray:
        return np.stack([physics[k] for k in sorted(physics)])

    _same(stacked(remote(load, 0).env.physics), stacked(env.physics),
          "another process, other physics")


def check_model(factory: Callable, params: dict | None = None,
                remote: Remote = pickled) -> None:
    """Builds for image and flat inputs it accepts; [B, classes] finite logits; the same
    initial parameters for the same seed in any process."""
    architecture = _built(MODELS, factory, params)
    spec = ModelSpec(architecture, (1, 8, 8), 10)
    x = torch.rand(5, 64)
    logits = spec.build()(x)
    assert logits.shape == (5, 10), "[B, classes] logits"
    _finite(logits, "logits")
    first = init_params(spec.build, 7)
    _same(init_params(spec.build, 7), first, "the same seed, other initial parameters")
    _same(remote(init_params, spec.build, 7), first, "another process, other parameters")


def check_attack(factory: Callable, params: dict | None = None,
                 remote: Remote = pickled) -> None:
    """An update attack sends [B, P] finite rows, the same for the same generator in any
    process; a gossip attack forges messages only for honest receivers."""
    attack: Attack = _built(ATTACKS, factory, params)
    if attack.corrupt is not None:
        x = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
        byz = torch.tensor([False, True, False, False, True, False])

        def send(seed: int) -> torch.Tensor:
            return attack.corrupt(x, byz, torch.Generator().manual_seed(seed))

        rows = send(1)
        assert rows.shape == (2, 5), "[B, P] rows"
        _finite(rows, "rows")
        _same(send(1), rows, "the same generator, other rows")
        _same(remote(send, 1), rows, "another process, other rows")
    if attack.forge is not None:
        nb = sample_neighbourhood()
        byzantine = torch.tensor([False, True, False, False, False, False])
        forged = attack.forge(nb, byzantine)
        assert forged is None or not byzantine[nb.own[forged.rows]].any(), "forges for peers"
        if forged is not None:
            _finite(forged.values, "forged messages")


def check_compressor(factory: Callable, params: dict | None = None,
                     remote: Remote = pickled) -> None:
    """[C, P] float32 values and [C] positive byte counts; a row depends on its own values
    and key alone (the same bits in any order, alongside any rows, in any process)."""
    compressor: Compressor = _built(COMPRESSORS, factory, params)
    x = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    keys = np.arange(4, dtype=np.uint64) * np.uint64(977) + np.uint64(5)
    out = compressor.compress(x, keys)
    assert out.values.shape == x.shape and out.values.dtype == torch.float32, "values"
    assert out.bytes.shape == (4,) and (out.bytes > 0).all(), "bytes"
    _finite(out.values, "values")
    perm = [2, 0, 3, 1]
    _same(compressor.compress(x[perm], keys[perm]).values, out.values[perm], "row order")
    _same(remote(lambda c: c.compress(x, keys).values, compressor), out.values,
          "another process")


def check_staleness(factory: Callable, params: dict | None = None,
                    remote: Remote = pickled) -> None:
    """s(0) = 1, values in (0, 1], non-increasing in tau, the same in any process."""
    fn = _built(STALENESS, factory, params)
    tau = np.arange(0.0, 50.0)
    s = fn(tau)
    assert s.shape == tau.shape and s[0] == 1.0, "s(0) = 1"
    assert np.all((s > 0) & (s <= 1)) and np.all(np.diff(s) <= 0), "in (0, 1], non-increasing"
    _same(remote(fn, tau), s, "another process")


def check_executor(factory: Callable, params: dict | None = None,
                   remote: Remote = pickled) -> None:
    """Deltas [C, P], losses and steps [C] that match the loop reference executor to 1e-5
    on a small MLP, with plain SGD, with SAM's steps (`sam_rho`) and with frozen feature
    layers (`frozen`: those coordinates stay exactly 0), the same bits in any process."""
    executor_class = _built(EXECUTORS, factory, params)
    spec = ModelSpec(MODELS.make("mlp", hidden=[8]), (6,), 3)
    model = spec.build()
    params_ = init_params(spec.build, 0)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(40, 6)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 3, 40))
    offsets, counts = np.array([0, 10, 25]), np.array([10, 15, 15])
    hp = LocalSGD(2, 4, 0.1)
    plan = batch_plan(np.array([1, 2, 3], dtype=np.uint64), offsets, counts, hp)

    def train(cls, hp=hp):
        return cls(model, ParamSpec.of(model))(params_, x, y, plan, hp)

    out = train(executor_class)
    ref = train(EXECUTORS["loop"])
    assert out.deltas.shape == (3, params_.numel()), "deltas [C, P]"
    torch.testing.assert_close(out.deltas, ref.deltas, atol=1e-5, rtol=1e-5,
                               msg="disagrees with the loop reference")
    _same(out.steps, ref.steps, "steps")
    sam = LocalSGD(2, 4, 0.1, sam_rho=0.5)
    torch.testing.assert_close(train(executor_class, sam).deltas,
                               train(EXECUTORS["loop"], sam).deltas, atol=1e-5, rtol=1e-5,
                               msg="disagrees with the loop reference under SAM (sam_rho)")
    features = sum(spec.layer_sizes()[:-2])  # freeze_features: only the output layer trains
    frozen = train(executor_class, LocalSGD(2, 4, 0.1, sam_rho=0.5, frozen=features)).deltas
    assert not frozen[:, :features].any(), "moved a frozen feature coordinate (frozen)"
    torch.testing.assert_close(frozen, train(EXECUTORS["loop"], LocalSGD(
        2, 4, 0.1, sam_rho=0.5, frozen=features)).deltas, atol=1e-5, rtol=1e-5,
        msg="disagrees with the loop reference with frozen features")
    _same(remote(train, executor_class).deltas, out.deltas, "another process")


def check_platform(factory: Callable, params: dict | None = None,
                   remote: Remote = pickled) -> None:
    """Finite, non-negative latency and aggregator-seconds; no arrival, no latency; the
    same timing for the arrivals in any order and in any process."""
    platform: Platform = _built(PLATFORMS, factory, params)
    arrivals = np.array([0.4, 0.1, 0.9, 0.3, 0.35, 0.8, 0.2])
    out = platform.timing(arrivals, 4_000_000, 0.9)
    assert all(math.isfinite(v) and v >= 0 for v in out[:2]), "finite, non-negative"
    assert platform.timing(np.zeros(0), 4_000_000, 0.5).latency_s == 0.0, "no arrival"
    assert platform.timing(arrivals[::-1].copy(), 4_000_000, 0.9) == out, "arrival order"
    assert remote(platform.timing, arrivals, 4_000_000, 0.9) == out, "another process"


def check_ranking(factory: Callable, params: dict | None = None,
                  remote: Remote = pickled) -> None:
    """A permutation of the items; unanimous rankings give themselves back; the same in any
    process."""
    aggregate = _built(RANKING, factory, params)
    rankings = np.array([[0, 1, 2, 3], [1, 0, 2, 3], [0, 2, 1, 3]])
    result = aggregate(rankings)
    assert sorted(result.ranking.tolist()) == [0, 1, 2, 3], "a permutation"
    assert aggregate(np.array([[2, 0, 1, 3]] * 3)).ranking.tolist() == [2, 0, 1, 3]
    _same(remote(aggregate, rankings).ranking, result.ranking, "another process")


CHECKERS: dict[str, tuple[Registry, Callable[..., None]]] = {
    "aggregation": (AGGREGATION, check_stage),
    "consensus": (CONSENSUS, check_consensus),
    "server": (SERVER_RULES, check_server_rule),
    "selection": (SELECTION, check_selection),
    "availability": (AVAILABILITY, check_availability),
    "distribution": (DISTRIBUTIONS, check_distribution),
    "topology": (TOPOLOGIES, check_topology),
    "mixing": (MIXING, check_mixing),
    "partition": (PARTITIONS, check_partition),
    "dataset": (DATASETS, check_dataset),
    "model": (MODELS, check_model),
    "attack": (ATTACKS, check_attack),
    "compression": (COMPRESSORS, check_compressor),
    "staleness": (STALENESS, check_staleness),
    "executor": (EXECUTORS, check_executor),
    "ranking": (RANKING, check_ranking),
    "platform": (PLATFORMS, check_platform),
}

# Parameters the checkers give entries whose defaults need a file or do not fit the tiny
# inputs (every other entry runs with its defaults).
EXAMPLE_PARAMS: dict[tuple[str, str], dict[str, Any]] = {
    ("distribution", "constant"): {"value": 2.0},
    ("distribution", "uniform"): {"low": 1.0, "high": 2.0},
    ("distribution", "lognormal"): {"median": 1.0, "sigma": 0.5},
    ("distribution", "pareto"): {"scale": 1.0, "shape": 2.0},
    ("distribution", "tiers"): {"values": [1.0, 2.0]},
    ("topology", "random_regular"): {"degree": 3},
    ("topology", "erdos_renyi"): {"p": 0.5},
    ("topology", "small_world"): {"k": 4, "beta": 0.2},
}


def check(kind: str, plugin: str | Callable, params: dict | None = None,
          remote: Remote = pickled) -> None:
    """Run the contract of registry `kind` (a key of CHECKERS) on a plugin: a registered
    name, "package.module:attr", or the factory itself."""
    registry, checker = CHECKERS[kind]
    factory = registry.factory(plugin, kind) if isinstance(plugin, str) else plugin
    checker(factory, params, remote)

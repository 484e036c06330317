"""FRL: the server's vote over clients' supermask edge rankings, as an aggregation stage.

The global model of FRL is a supermask model (scenarios/supermask.py): its flat parameter
vector holds only edge scores, layer after layer. A layer's scores are always a permutation of
the sorted values it started with, so the scores encode the global ranking of the layer's edges.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.core.errors import ConfigError
from engine.core.updates import Updates
from policies.base import Aggregator, stage
from policies.ranks import RankAggregator, frl_client_ranking, frl_vote

State = tuple[torch.Tensor, torch.Tensor]  # (global scores [P], each layer's sorted values [P])


def _spans(layers: tuple[int, ...] | None, size: int) -> list[tuple[int, int]]:
    """(start, stop) of each ranked layer in the flat vector; None: one layer of `size`."""
    sizes = (size,) if layers is None else layers
    if sum(sizes) != size:
        raise ConfigError(f"aggregation.frl: supermask layers of {sum(sizes)} edges in all do "
                          f"not match the model's {size} parameters")
    stops = np.cumsum(sizes).tolist()
    return list(zip([0, *stops[:-1]], stops, strict=True))


def _voted_layer(client_scores: torch.Tensor, values: torch.Tensor,
                 vote: RankAggregator) -> torch.Tensor:
    """One layer's new global scores: the consensus' p-th best edge gets the p-th largest of
    the layer's initial score values (`values`, ascending), as FRL's `FRL_Vote` writes them."""
    rankings = frl_client_ranking(client_scores.double().numpy())  # [K, M], 0 = highest score
    position = torch.from_numpy(vote(rankings).ranking)  # consensus, 0 = best edge
    return values.flip(0)[position]


@stage("aggregator", decomposable=False)
def frl(supermask_layers: tuple[int, ...] | None = None) -> Aggregator:
    """FRL, Federated Rank Learning (Mozaffari, Shejwalkar & Houmansadr, "Every Vote Counts:
    Ranking-Based Training of Federated Learning to Resist Poisoning Attacks", USENIX Security
    2023; arXiv:2110.04350; code: SPIN-UMass/FRL, FL_train.py `FRL_train`, utils.py `Find_rank`
    and `FRL_Vote`).

    In FRL the server holds a random network with frozen weights and a ranking of each layer's
    edges. Each round the selected clients start from the global scores (the layer's initial
    score values, sorted, placed by the global ranking), train them locally with edge-popup,
    and send each layer's ranking: its edges sorted by their trained score. The server, per
    layer, sums each edge's position over the clients (one vote each: client weights are not
    used) and sorts the sums: that is the new global ranking, and the new global scores place
    the layer's initial values by it, the largest on the edge with the highest sum. The model
    is the supermask of those scores (top k% of each layer's edges).

    Here clients send score deltas; the stage keeps the global scores in its state, rebuilds
    each client's scores (global + delta, up to float32 rounding), ranks them with
    `policies.ranks.frl_client_ranking`, votes with `policies.ranks.frl_vote` (the same sum of
    positions, a Borda count) and returns new scores - global scores as the step. The engine
    fills `supermask_layers` (the edges of each ranked layer, from task.model.supermask); left
    None, the whole vector is one layer. FRL sets the global model itself: it is the last
    stage of a chain and not decomposable (it needs every client's scores)."""
    if supermask_layers == ():
        raise ConfigError("task.model.supermask: aggregation frl ranks the edges of a "
                          "supermask model; set task.model.supermask (e.g. {keep: 0.5})")
    vote = frl_vote()

    def init(params: torch.Tensor) -> State:
        spans = _spans(supermask_layers, params.numel())
        values = torch.cat([params[a:b].sort().values for a, b in spans])
        return params.clone(), values

    def update(updates: Updates, state: State) -> tuple[torch.Tensor, State]:
        scores, values = state
        clients = scores + updates.deltas
        new = torch.cat([_voted_layer(clients[:, a:b], values[a:b], vote)
                         for a, b in _spans(supermask_layers, scores.numel())])
        step = new - scores
        return step, (scores + step, values)  # the engine's params + step, bit for bit

    return Aggregator(init, update)


frl.sets_global_model = True  # build_aggregator: no optimizer may rescale its step


frl.synchronous_only = (
    "FRL's vote ranks edge scores that every client trained from the same global ranking; "
    "stale updates were trained from other rankings")

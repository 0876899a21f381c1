"""Robust combinations of the round's replies (`server.robust`), for servers that must survive a few
clients sending well-formed, bounded, hostile updates. Each replaces the weighted mean inside any
rule that averages replies (FedAvg, FLEx's shared part, the server optimisers, SCAFFOLD): the
server optimisers then step along the robust aggregate's pseudo-gradient.

- `median`: the coordinate-wise median (Yin et al. 2018), Flower's `aggregate_median` (FedMedian):
  unweighted; with an even count, the mean of the two middle values.
- `trimmed-mean`: per coordinate, drop the int(beta * n) smallest and largest values and average the
  rest (Yin et al. 2018), Flower's `aggregate_trimmed_avg` (FedTrimmedAvg): unweighted.
- `krum`: multi-Krum (Blanchard et al. 2017): each reply's score is the sum of its squared L2
  distances to its n - f - 2 nearest other replies (at least 1); the `keep` lowest-scoring replies
  are averaged with the usual weighting (`keep` = 1 is Krum). Written here because the server
  reports which clients it kept; the test checks it against Flower's `aggregate_krum`.

All of them work on every tensor of the replies, in name order, in float32.
"""

from __future__ import annotations

import numpy as np
import torch

from flexmoe.tensors import Tensors


def median(dicts: list[Tensors]) -> Tensors:
    from flwr.server.strategy.aggregate import aggregate_median

    return _through_flower(dicts, aggregate_median)


def trimmed_mean(dicts: list[Tensors], beta: float) -> Tensors:
    from flwr.server.strategy.aggregate import aggregate_trimmed_avg

    return _through_flower(dicts, lambda results: aggregate_trimmed_avg(results, beta))


def krum_scores(dicts: list[Tensors], f: int) -> torch.Tensor:
    """(n,) Krum scores: sum of squared distances to the n - f - 2 nearest others (at least 1)."""
    names = sorted(dicts[0])
    flat = torch.stack([torch.cat([d[n].double().reshape(-1) for n in names]) for d in dicts])
    distances = torch.cdist(flat, flat).pow(2)
    distances.fill_diagonal_(float("inf"))  # a reply is not its own neighbour
    nearest = max(1, len(dicts) - f - 2)
    nearest = min(nearest, len(dicts) - 1)
    if nearest == 0:  # a single reply: nothing to compare with
        return torch.zeros(len(dicts), dtype=torch.float64)
    return distances.topk(nearest, dim=1, largest=False).values.sum(dim=1)


def krum_selection(dicts: list[Tensors], f: int, keep: int) -> list[int]:
    """Indices of the `keep` lowest-scoring replies (ties: the earlier reply), in reply order."""
    scores = krum_scores(dicts, f)
    order = sorted(range(len(dicts)), key=lambda i: (float(scores[i]), i))
    return sorted(order[: min(keep, len(dicts))])


def _through_flower(dicts: list[Tensors], aggregate) -> Tensors:
    """Apply one of Flower's aggregate functions (lists of NumPy arrays, in name order) to flat dicts."""
    names = sorted(dicts[0])
    results = [([d[n].detach().float().cpu().numpy() for n in names], 1) for d in dicts]
    combined = aggregate(results)
    return {n: torch.from_numpy(np.asarray(a, dtype=np.float32)).to(dicts[0][n].dtype)
            for n, a in zip(names, combined)}

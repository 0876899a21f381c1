"""Server rules: how the server turns the round's replies into the new global weights.

A rule is a small object of its own, composed by methods (FedAvg and FLEx use `WeightedMean` or
a server optimiser; FLEx + FC-MoE uses FC-MoE's conflict-aware rule): no method builds another.
Server optimisers work on the pseudo-gradient delta = mean_i(x_i) - x:

FedAdagrad, FedYogi, FedAdam: Reddi et al. 2021, "Adaptive Federated Optimization", Alg. 2:
    m = beta1 m + (1 - beta1) delta
    v = v + delta^2                                   (Adagrad)
    v = v - (1 - beta2) delta^2 sign(v - delta^2)     (Yogi)
    v = beta2 v + (1 - beta2) delta^2                 (Adam)
    x = x + eta m / (sqrt(v) + tau)
with m_0 = 0, v_0 = tau^2 (the paper asks v_{-1} >= tau^2) and no bias correction. Defaults
(`[server]`): beta1 = 0.9, beta2 = 0.99 (the paper's), eta = 1e-2, tau = 1e-3 (from its grids).
FedAvgM: Hsu et al. 2019: m = beta m + delta, x = x + eta m (defaults eta = 1, beta = 0.9).

With `server.robust` the round's mean is a robust combination instead (`robust_mean`, the
functions in `robust`): every rule that averages replies composes with it, the optimisers included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexmoe.config import RunConfig
from flexmoe.methods.rules_config import SERVER_RULES
from flexmoe.methods.robust import krum_selection, median, trimmed_mean
from flexmoe.tensors import Tensors, strip_prefix, with_prefix


@dataclass(frozen=True)
class Reply:
    """One client's upload, as the server sees it."""

    tensors: Tensors
    num_examples: int
    client: int = -1  # the sender's client id, for logging a rejected update (-1: unknown)


def weighted_mean(dicts: list[Tensors], weights: list[float]) -> Tensors:
    """Per-key weighted mean in float32 (then back to each tensor's dtype)."""
    total = float(sum(weights))
    if not dicts or total <= 0:
        raise ValueError("weighted_mean needs at least one reply with positive weight")
    out = {}
    for name, first in dicts[0].items():
        acc = sum(d[name].float() * (w / total) for d, w in zip(dicts, weights))
        out[name] = acc.to(first.dtype)
    return out


def robust_mean(config: RunConfig, replies: list[Reply], weights: list[float]) -> tuple[Tensors, dict]:
    """The replies' combination `server.robust` asks for (their weighted mean by default), and its
    metrics (multi-Krum: `krum_kept`, the clients whose replies were averaged)."""
    server, dicts = config.server, [r.tensors for r in replies]
    if server.robust == "median":
        return median(dicts), {}
    if server.robust == "trimmed-mean":
        return trimmed_mean(dicts, server.trim_beta), {}
    if server.robust == "krum":
        keep = server.krum_keep or max(1, len(replies) - server.krum_f)
        kept = krum_selection(dicts, server.krum_f, keep)
        return weighted_mean([dicts[i] for i in kept], [weights[i] for i in kept]), \
            {"krum_kept": [replies[i].client for i in kept]}
    return weighted_mean(dicts, weights), {}


class ServerRule:
    """The server side of aggregation: its state and one aggregation step."""

    def __init__(self, config: RunConfig):
        self.config = config

    def init_state(self, global_weights: Tensors) -> Tensors:
        return {}

    def aggregate(self, global_weights: Tensors, state: Tensors, replies: list[Reply]) -> tuple[Tensors, Tensors, dict]:
        """(new global weights, new state, metrics of the step)."""
        raise NotImplementedError


class WeightedMean(ServerRule):
    """FedAvg: the replies' mean, weighted by training examples (or uniform, `server.weighting`)."""

    def aggregate(self, global_weights: Tensors, state: Tensors, replies: list[Reply]) -> tuple[Tensors, Tensors, dict]:
        mean, metrics = self.average(replies)
        return mean, state, metrics

    def average(self, replies: list[Reply]) -> tuple[Tensors, dict]:
        """(the round's mean, or its robust combination with `server.robust`; its metrics)."""
        uniform = self.config.server.weighting == "uniform"
        weights = [1.0 if uniform else float(r.num_examples) for r in replies]
        return robust_mean(self.config, replies, weights)


class _ServerOptimizer(WeightedMean):
    def init_state(self, global_weights: Tensors) -> Tensors:
        zeros = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in global_weights.items()}
        tau_sq = {n: torch.full_like(t, self.config.server.tau**2) for n, t in zeros.items()}
        return {**with_prefix("m.", zeros), **with_prefix("v.", tau_sq)}

    def aggregate(self, global_weights: Tensors, state: Tensors, replies: list[Reply]) -> tuple[Tensors, Tensors, dict]:
        mean, metrics = self.average(replies)
        m_old, v_old = strip_prefix("m.", state), strip_prefix("v.", state)
        new_global, m_new, v_new = {}, {}, {}
        for name, x in global_weights.items():
            delta = mean[name].float() - x.float()
            m_new[name], v, step = self.step(delta, m_old[name], v_old.get(name))
            if v is not None:
                v_new[name] = v
            new_global[name] = (x.float() + step).to(x.dtype)
        return new_global, {**with_prefix("m.", m_new), **with_prefix("v.", v_new)}, metrics

    def step(self, delta, m, v):
        """(new m, new v, the update added to x)."""
        s = self.config.server
        m = s.beta1 * m + (1 - s.beta1) * delta
        v = self.second_moment(delta, v)
        return m, v, s.lr * m / (v.sqrt() + s.tau)

    def second_moment(self, delta, v):
        raise NotImplementedError


class AdagradRule(_ServerOptimizer):
    def second_moment(self, delta, v):
        return v + delta**2


class YogiRule(_ServerOptimizer):
    def second_moment(self, delta, v):
        sq = delta**2
        return v - (1 - self.config.server.beta2) * sq * torch.sign(v - sq)


class AdamRule(_ServerOptimizer):
    def second_moment(self, delta, v):
        beta2 = self.config.server.beta2
        return beta2 * v + (1 - beta2) * delta**2


class MomentumRule(_ServerOptimizer):
    def init_state(self, global_weights: Tensors) -> Tensors:
        return with_prefix("m.", {n: torch.zeros_like(t, dtype=torch.float32) for n, t in global_weights.items()})

    def step(self, delta, m, v):
        s = self.config.server
        m = s.momentum * m + delta
        return m, v, s.momentum_lr * m


# the rules `flex.aggregator` chooses from (the names of the methods that use them alone)
RULES: dict[str, type[ServerRule]] = dict(zip(
    SERVER_RULES, (WeightedMean, MomentumRule, AdagradRule, YogiRule, AdamRule), strict=True))

"""Server optimisers over the pseudo-gradient delta = mean_i(x_i) - x.

FedAdagrad, FedYogi, FedAdam: Reddi et al. 2021, "Adaptive Federated Optimization", Alg. 2:
    m = beta1 m + (1 - beta1) delta
    v = v + delta^2                                   (Adagrad)
    v = v - (1 - beta2) delta^2 sign(v - delta^2)     (Yogi)
    v = beta2 v + (1 - beta2) delta^2                 (Adam)
    x = x + eta m / (sqrt(v) + tau)
with m_0 = 0, v_0 = tau^2 (the paper asks v_{-1} >= tau^2) and no bias correction. Defaults
(`[server]`): beta1 = 0.9, beta2 = 0.99 (the paper's), eta = 1e-2, tau = 1e-3 (from its grids).
FedAvgM: Hsu et al. 2019: m = beta m + delta, x = x + eta m (defaults eta = 1, beta = 0.9).
"""

import torch

from flexmoe.methods.base import Method, Reply, Tensors, strip_prefix, with_prefix


class _ServerOptimizer(Method):
    def init_server_state(self, global_weights: Tensors) -> Tensors:
        zeros = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in global_weights.items()}
        tau_sq = {n: torch.full_like(t, self.config.server.tau**2) for n, t in zeros.items()}
        return {**with_prefix("m.", zeros), **with_prefix("v.", tau_sq)}

    def aggregate(
        self, global_weights: Tensors, server_state: Tensors, replies: list[Reply]
    ) -> tuple[Tensors, Tensors, dict]:
        mean = self.average(replies)
        m_old, v_old = strip_prefix("m.", server_state), strip_prefix("v.", server_state)
        new_global, m_new, v_new = {}, {}, {}
        for name, x in global_weights.items():
            delta = mean[name].float() - x.float()
            m_new[name], v, step = self.step(delta, m_old[name], v_old.get(name))
            if v is not None:
                v_new[name] = v
            new_global[name] = (x.float() + step).to(x.dtype)
        return new_global, {**with_prefix("m.", m_new), **with_prefix("v.", v_new)}, {}

    def step(self, delta, m, v):
        """(new m, new v, the update added to x)."""
        s = self.config.server
        m = s.beta1 * m + (1 - s.beta1) * delta
        v = self.second_moment(delta, v)
        return m, v, s.lr * m / (v.sqrt() + s.tau)

    def second_moment(self, delta, v):
        raise NotImplementedError


class FedAdagrad(_ServerOptimizer):
    name = "fedadagrad"

    def second_moment(self, delta, v):
        return v + delta**2


class FedYogi(_ServerOptimizer):
    name = "fedyogi"

    def second_moment(self, delta, v):
        sq = delta**2
        return v - (1 - self.config.server.beta2) * sq * torch.sign(v - sq)


class FedAdam(_ServerOptimizer):
    name = "fedadam"

    def second_moment(self, delta, v):
        beta2 = self.config.server.beta2
        return beta2 * v + (1 - beta2) * delta**2


class FedAvgM(_ServerOptimizer):
    name = "fedavgm"

    def init_server_state(self, global_weights: Tensors) -> Tensors:
        return with_prefix("m.", {n: torch.zeros_like(t, dtype=torch.float32) for n, t in global_weights.items()})

    def step(self, delta, m, v):
        s = self.config.server
        m = s.momentum * m + delta
        return m, v, s.momentum_lr * m

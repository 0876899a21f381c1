"""SCAFFOLD (Karimireddy et al. 2020, Algorithm 1 with option II).

Server state: control variate c. Client state: its control variate c_i (zero at first).
Locally every gradient is corrected by (c - c_i). After K local steps at learning rate eta_l
the client sets c_i+ = c_i - c + (x - y_i) / (K eta_l) and sends (y_i - x, c_i+ - c_i).
The server applies x += eta_g * mean(dy) and c += |S|/N * mean(dc) (uniform means, as published).
Option II assumes SGD; with AdamW the same correction is applied to the gradient before the
optimiser step (`train.optimizer = "sgd"` gives the published algorithm exactly).
"""

import torch

from flexmoe.methods.base import LocalRun, Method, Tensors, TensorSpec, TrainHooks
from flexmoe.methods.registry import register_method
from flexmoe.methods.rules import Reply, ServerRule, robust_mean
from flexmoe.tensors import strip_prefix, with_prefix


class ScaffoldRule(ServerRule):
    """x += eta_g * mean(dy); c += |S|/N * mean(dc), uniform means as published (with `server.robust`,
    their robust combination: of both prefixes together, so multi-Krum keeps whole replies)."""

    def init_state(self, global_weights: Tensors) -> Tensors:
        return with_prefix("control.", {n: torch.zeros_like(t, dtype=torch.float32) for n, t in global_weights.items()})

    def aggregate(self, global_weights: Tensors, state: Tensors, replies: list[Reply]) -> tuple[Tensors, Tensors, dict]:
        mean, metrics = robust_mean(self.config, replies, [1.0] * len(replies))
        mean_dy, mean_dc = strip_prefix("delta.", mean), strip_prefix("control_delta.", mean)
        eta_g = self.config.scaffold.server_lr
        fraction = len(replies) / self.config.num_clients
        new_global = {n: (x.float() + eta_g * mean_dy[n]).to(x.dtype) for n, x in global_weights.items()}
        server_c = strip_prefix("control.", state)
        new_c = {n: c + fraction * mean_dc[n] for n, c in server_c.items()}
        return new_global, with_prefix("control.", new_c), metrics


@register_method("scaffold")
class Scaffold(Method):
    rule_class = ScaffoldRule

    def downlink(self, global_weights: Tensors, server_state: Tensors) -> Tensors:
        return {**global_weights, **server_state}

    def start_weights(self, received: Tensors, client_state: Tensors, initial: Tensors) -> Tensors:
        return {name: received[name] for name in initial}

    def train_hooks(self, received: Tensors, client_state: Tensors) -> TrainHooks:
        server_c = strip_prefix("control.", received)
        client_c = strip_prefix("control.", client_state)
        correction = {n: c - client_c.get(n, torch.zeros_like(c)) for n, c in server_c.items()}
        return TrainHooks(grad_correction=correction)

    def uplink(
        self, received: Tensors, trained: Tensors, client_state: Tensors, run: LocalRun
    ) -> tuple[Tensors, Tensors]:
        server_c = strip_prefix("control.", received)
        client_c = strip_prefix("control.", client_state)
        scale = 1.0 / (run.steps * run.lr)
        delta_y, delta_c, new_c = {}, {}, {}
        for name, y in trained.items():
            x = received[name].float()
            c_i = client_c.get(name, torch.zeros_like(x))
            new_c[name] = c_i - server_c[name] + (x - y.float()) * scale
            delta_y[name] = y.float() - x
            delta_c[name] = new_c[name] - c_i
        message = {**with_prefix("delta.", delta_y), **with_prefix("control_delta.", delta_c)}
        return message, with_prefix("control.", new_c)

    def reply_spec(self, global_weights: Tensors) -> dict[str, TensorSpec]:
        spec = {n: TensorSpec(tuple(t.shape), torch.float32) for n, t in global_weights.items()}
        return {**with_prefix("delta.", spec), **with_prefix("control_delta.", spec)}

    def reply_update(self, tensors: Tensors, global_weights: Tensors) -> Tensors:
        return {name: t.float() for name, t in strip_prefix("delta.", tensors).items()}

    def with_update(self, tensors: Tensors, global_weights: Tensors, update: Tensors) -> Tensors:
        return {**tensors, **with_prefix("delta.", update)}

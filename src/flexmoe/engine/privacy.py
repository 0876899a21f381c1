"""Central differential privacy for the shared part, with server-side fixed clipping.

The mechanism of Flower's `DifferentialPrivacyServerSideFixedClipping` (McMahan et al. 2018,
"Learning Differentially Private Recurrent Language Models"), with Flower's own helpers:
each client's update (its reply minus the global model) is clipped to L2 norm C
(`clip_inputs_inplace`), the clipped updates are averaged uniformly, and Gaussian noise of
std z * C / m (`compute_stdv`; m = updates averaged) is added to the average. The method's
aggregation (FedAvg, or a server optimiser) then takes the noised average as its one reply,
so a server optimiser only post-processes the private release. Two deliberate differences
from Flower's wrapper: the noise is drawn from a generator seeded by (seed, round), so a run
is reproducible and a resumed run identical; and m counts the updates actually averaged (the
exact sensitivity of their mean when clients failed or were rejected), not those sampled.

(epsilon, delta) comes from Flower's RDP accountant (which wraps Google's dp-accounting),
client-level, for `rounds` compositions of a Poisson-sampled Gaussian mechanism with rate
clients_per_round / num_clients, add-or-remove-one neighbours: the standard analysis of
DP-FedAvg, whose fixed-size sampling it approximates as McMahan et al. do.
"""

from __future__ import annotations

import numpy as np
import torch

from flexmoe.config import PrivacyConfig, RunConfig
from flexmoe.methods.base import Method
from flexmoe.methods.rules import Reply
from flexmoe.tensors import Tensors

ORDERS = tuple(float(order) for order in range(2, 257))  # integer RDP orders: exact, no convergence warnings
_NOISE_STREAM = 0x0D9  # separates the noise draws from every other seeded stream of a round


def enabled(privacy: PrivacyConfig) -> bool:
    return privacy.noise_multiplier > 0


def private_release(method: Method, global_weights: Tensors, replies: list[Reply], privacy: PrivacyConfig,
                    seed: int, round_index: int) -> tuple[Reply, dict]:
    """The one reply the method aggregates: global weights + the noised mean of the clipped
    updates; and the round's metrics (noise std, how many updates were clipped)."""
    from flwr.supercore.differential_privacy import clip_inputs_inplace, compute_stdv, get_norm

    names = sorted(global_weights)
    total = [np.zeros(tuple(global_weights[n].shape), dtype=np.float64) for n in names]
    clipped = 0
    for reply in replies:
        update = method.reply_update(reply.tensors, global_weights)
        arrays = [update[n].detach().to(torch.float64).numpy().copy() for n in names]
        if get_norm(arrays) > privacy.clip_norm:
            clip_inputs_inplace(arrays, privacy.clip_norm)
            clipped += 1
        for acc, array in zip(total, arrays):
            acc += array
    std = compute_stdv(privacy.noise_multiplier, privacy.clip_norm, len(replies))
    rng = np.random.default_rng([seed, round_index, _NOISE_STREAM])
    noised = {n: acc / len(replies) + rng.normal(0.0, std, acc.shape) for n, acc in zip(names, total)}
    weights = {n: (global_weights[n].double() + torch.from_numpy(noised[n])).to(global_weights[n].dtype)
               for n in names}
    return Reply(weights, num_examples=1), {"dp_noise_std": std, "dp_clipped": clipped}


def epsilon(config: RunConfig, rounds: int) -> float:
    """Client-level epsilon at `privacy.delta` after `rounds` private releases."""
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig as AccountingConfig, SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    privacy = config.privacy
    accountant = RdpAccountant(AccountingConfig(privacy.delta, config.num_clients,
                                                NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.POISSON),
                               orders=ORDERS)
    accountant.compose(GaussianPrivacyEvent(privacy.noise_multiplier, config.clients_per_round, config.num_clients),
                       count=rounds)
    return float(accountant.get_epsilon(privacy.delta))

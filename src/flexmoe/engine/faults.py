"""The attack harness (`[faults]`): a research tool, off by default, for measuring what a robust
server rule buys. The clients in `faults.malicious_clients` train honestly, then rewrite the update
their uplink carries (`Method.reply_update`: the reply relative to what they received) before it
is sent: well-formed, finite and of the right layout, so validation lets it through unless a norm
bound catches it. `ClientRunner.train` applies it; the Flower ServerApp refuses a config with
attackers (a deployment's clients are not the server's to corrupt).

Attacks (Blanchard et al. 2017; Li et al. 2019, "RSA"; Fang et al. 2020): "sign-flip" sends
-update; "scale:<s>" s * update; "noise:<sigma>" update + N(0, sigma^2) per value, seeded by
(seed, round, client); "same-value" every value equal to the update's RMS (the norm of an honest
update, none of its direction), "same-value:<c>" every value c.
"""

from __future__ import annotations

import math

import torch

from flexmoe.config import FaultsConfig
from flexmoe.tensors import Tensors

_NOISE_STREAM = 0xA77  # separates the attack's noise from every other seeded stream


def attacks(faults: FaultsConfig, client_id: int) -> bool:
    return client_id in faults.malicious_clients


def attacked_update(attack: str, update: Tensors, seed: int) -> Tensors:
    """The update a malicious client sends instead of `update` (float32, same names and shapes)."""
    kind, _, argument = attack.partition(":")
    names = sorted(update)
    if kind == "sign-flip":
        return {n: -update[n].float() for n in names}
    if kind == "scale":
        return {n: float(argument) * update[n].float() for n in names}
    if kind == "noise":
        generator = torch.Generator().manual_seed(seed)
        return {n: update[n].float() + float(argument) * torch.randn(update[n].shape, generator=generator)
                for n in names}
    if kind == "same-value":
        value = float(argument) if argument else _rms(update)
        return {n: torch.full(update[n].shape, value) for n in names}
    raise ValueError(f"unknown attack {attack!r}")  # the config refuses it first


def noise_seed(run_seed: int, round_index: int, client_id: int) -> int:
    from flexmoe.data.sample import derived_seed

    return derived_seed(run_seed, round_index, client_id, _NOISE_STREAM)


def _rms(update: Tensors) -> float:
    count = sum(t.numel() for t in update.values())
    total = sum(float(t.double().pow(2).sum()) for t in update.values())
    return math.sqrt(total / count) if count else 0.0

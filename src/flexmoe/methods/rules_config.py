"""The server rules' settings, torch-free: their names (one constant; `rules.RULES` maps each to
its class, `flex.aggregator` chooses among them) and the `[server]` section every rule that
averages the replies reads (the FedAvg family, FedAvg-FT, and FLEx's `flex.aggregator`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from flexmoe.settings import Section

SERVER_RULES = ("fedavg", "fedavgm", "fedadagrad", "fedyogi", "fedadam")  # flexmoe.methods.rules.RULES


class ServerConfig(Section):
    """Server optimisers (Reddi et al. 2021, "Adaptive Federated Optimization"; FedAvgM: Hsu et al. 2019).

    Defaults: beta1 = 0.9, beta2 = 0.99 as in Reddi et al.; tau = 1e-3 and lr = 1e-2 from
    their tuned grids; FedAvgM momentum 0.9 with server lr 1 - 0.9 = 0.1: the momentum sums a
    geometric series of updates, so the long-run step is lr / (1 - momentum) times the mean update
    (Hsu et al.'s effective learning rate); lr 0.1 keeps it at FedAvg's 1 (lr 1.0 made it 10 and
    diverged: ROUGE-L 0.005, held-out loss +0.90 in benchmarks/results/fidelity-2026-11-21.md).
    """

    weighting: Literal["examples", "uniform"] = "examples"
    lr: float = Field(1e-2, gt=0)  # FedAdam/FedYogi/FedAdagrad eta
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)
    momentum_lr: float = Field(0.1, gt=0)  # FedAvgM eta (effective step eta / (1 - momentum))
    momentum: float = Field(0.9, ge=0, lt=1)  # FedAvgM beta
    # a robust combination of the replies instead of their mean (methods/robust.py), for any method
    # whose rule averages them (the server optimisers then step along it): the coordinate-wise
    # "median", the "trimmed-mean" (trim_beta) or multi-"krum" (krum_f, krum_keep); median and
    # trimmed mean are unweighted, multi-Krum averages the replies it keeps with `weighting`
    robust: Literal["none", "median", "trimmed-mean", "krum"] = "none"
    trim_beta: float = Field(0.25, ge=0, lt=0.5)  # per coordinate, int(trim_beta * n) replies cut at each end
    krum_f: int = Field(1, ge=0)  # hostile clients multi-Krum tolerates (scores over n - f - 2 neighbours)
    krum_keep: int = Field(0, ge=0)  # replies multi-Krum averages; 0 = n - f; 1 = Krum

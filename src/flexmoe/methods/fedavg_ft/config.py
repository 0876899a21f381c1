"""FedAvg-FT's declaration, torch-free: FedAvg (the `[server]` section) with a local fine-tuning of the shared weights."""

from __future__ import annotations

from flexmoe.methods.registry import declare_method

declare_method("fedavg-ft", section="server", private=True)

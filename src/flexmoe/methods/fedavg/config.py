"""FedAvg's declaration, torch-free: the server rule reads the `[server]` section (methods/rules_config.py)."""

from __future__ import annotations

from flexmoe.methods.registry import declare_method

declare_method("fedavg", section="server", private=True)

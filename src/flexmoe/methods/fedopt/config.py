"""The server optimisers' declarations, torch-free: each reads the `[server]` section (methods/rules_config.py)."""

from __future__ import annotations

from flexmoe.methods.registry import declare_method

declare_method("fedavgm", section="server", private=True)
declare_method("fedadagrad", section="server", private=True)
declare_method("fedyogi", section="server", private=True)
declare_method("fedadam", section="server", private=True)

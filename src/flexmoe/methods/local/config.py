"""Local training's declaration, torch-free: no settings of its own, nothing sent, so nothing to average."""

from __future__ import annotations

from flexmoe.methods.registry import declare_method

declare_method("local", averages=False)

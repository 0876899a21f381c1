"""Flat `{name: tensor}` dicts: what methods, the wire, the run directory and the training loop
pass around. Control variates, deltas and optimiser moments reuse parameter names behind a prefix
("control.", "delta.", "m.", ...)."""

from __future__ import annotations

import torch

Tensors = dict[str, torch.Tensor]


def with_prefix(prefix: str, tensors: Tensors) -> Tensors:
    return {prefix + name: t for name, t in tensors.items()}


def strip_prefix(prefix: str, tensors: Tensors) -> Tensors:
    return {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}


def cpu_clone(tensors: Tensors) -> Tensors:
    return {name: t.detach().to("cpu").clone() for name, t in tensors.items()}

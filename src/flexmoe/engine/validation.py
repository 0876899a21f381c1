"""Server-side checks of client updates, before anything is aggregated.

A reply must carry exactly the tensors the method expects (`Method.reply_spec`: names, shapes,
dtypes), only finite values, a positive example count, and, with `validation.max_update_norm`,
an update (`Method.reply_update`: the reply minus the global model) no longer than the bound.
A reply that fails is rejected with the reason and the round aggregates the rest: one broken
or malicious client cannot poison everyone's model. Both engines go through
`ServerRunner.aggregate`, which calls `split_valid`.
"""

from __future__ import annotations

import math

import torch

from flexmoe.config import ValidationConfig
from flexmoe.methods.base import Method
from flexmoe.methods.rules import Reply
from flexmoe.tensors import Tensors


def split_valid(method: Method, settings: ValidationConfig, global_weights: Tensors,
                replies: list[Reply]) -> tuple[list[Reply], list[dict]]:
    """(the valid replies, in order; {"client", "reason"} for each rejected one)."""
    spec = method.reply_spec(global_weights)
    accepted, rejected = [], []
    for reply in replies:
        reason = problem(method, spec, settings, global_weights, reply)
        if reason is None:
            accepted.append(reply)
        else:
            rejected.append({"client": reply.client, "reason": reason})
    return accepted, rejected


def problem(method: Method, spec: dict, settings: ValidationConfig, global_weights: Tensors,
            reply: Reply) -> str | None:
    """Why `reply` must be rejected, or None."""
    tensors = reply.tensors
    missing = sorted(name for name, want in spec.items() if want.required and name not in tensors)
    if missing:
        return f"missing tensor {missing[0]!r} ({len(missing)} missing)"
    unexpected = sorted(name for name in tensors if name not in spec)
    if unexpected:
        return f"unexpected tensor {unexpected[0]!r} ({len(unexpected)} unexpected)"
    for name in sorted(tensors):
        tensor, want = tensors[name], spec[name]
        if tuple(tensor.shape) != want.shape:
            return f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {want.shape}"
        if tensor.dtype != want.dtype:
            return f"tensor {name!r} has dtype {tensor.dtype}, expected {want.dtype}"
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"tensor {name!r} holds NaN or Inf"
    if not isinstance(reply.num_examples, int) or reply.num_examples <= 0:
        return f"num_examples = {reply.num_examples!r}, expected a positive integer"
    bound = settings.max_update_norm
    if bound > 0:
        norm = update_norm(method.reply_update(tensors, global_weights))
        if not norm <= bound:  # also catches an overflow to inf
            return f"update norm {norm:.6g} exceeds validation.max_update_norm = {bound:g}"
    return None


def update_norm(update: Tensors) -> float:
    """L2 norm of all tensors together, accumulated in float64 in name order (the same value
    whatever order the dict was built in, e.g. after a resume)."""
    return math.sqrt(sum(float(update[name].double().pow(2).sum()) for name in sorted(update)))

"""The FLEx graft as plain torch modules, and the hooks that add it to an MoE block.

    y' = y + sigmoid(w.x + b) * G(x)          (gate "none": y' = y + G(x))

This file imports nothing from flexmoe: `flexmoe export` copies it verbatim into every exported
model directory (as flexmoe_graft.py), so a personalised model loaded with plain transformers
(trust_remote_code) runs exactly the code it was trained with. A graft is rebuilt anywhere from
its constructor arguments (`ExpertGraft.init_args`, JSON) and its state dict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

GRAFT = "graft"  # attribute of the MoE block holding its graft; every personal name contains it
# transformers' `_keep_in_fp32_modules_strict` patterns for the graft's floating tensors: they keep
# fp32 on a half-precision base, as in training (a plain "graft" would turn its expert ids to floats)
FP32_PATTERNS = (f"{GRAFT}.*weight", f"{GRAFT}.*bias")


class ExpertMLP(nn.Module):
    """One expert as a standalone gated MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, act_fn: nn.Module):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def log_scores(logits: torch.Tensor, score: str) -> torch.Tensor:
    """Log of the family's per-expert score; a softmax over a kept subset of these gives the
    renormalised weights of a router restricted to that subset."""
    return F.logsigmoid(logits) if score == "sigmoid" else logits


class ExpertGraft(nn.Module):
    """A trainable copy of k experts of one MoE layer plus its adaptive gate.

    G(x) = output_scale * sum_j w_j(x) G_j(x), with w the layer's router restricted to the k
    grafted experts (a trainable copy of their router rows; w = 1 when k = 1). `hidden_act` names
    the experts' activation (transformers' ACT2FN); `clone_input`: the family scales the block
    input in place in train mode (mixtral, phimoe), so the hook keeps a copy of it.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, k: int, gate: str, hidden_act: str,
                 score: str = "softmax", output_scale: float = 1.0, clone_input: bool = False):
        super().__init__()
        self.init_args = dict(hidden_size=hidden_size, intermediate_size=intermediate_size, k=k, gate=gate,
                              hidden_act=hidden_act, score=score, output_scale=output_scale, clone_input=clone_input)
        self.experts = nn.ModuleList(
            ExpertMLP(hidden_size, intermediate_size, ACT2FN[hidden_act]) for _ in range(k)
        )
        self.router = nn.Linear(hidden_size, k, bias=False) if k > 1 else None
        self.gate = nn.Linear(hidden_size, 1) if gate == "sigmoid" else None
        self.register_buffer("expert_ids", torch.zeros(k, dtype=torch.long))
        self.score = score
        self.output_scale = output_scale
        self.clone_input = clone_input
        self.enabled = True
        self.pending_input: torch.Tensor | None = None  # the block input, from the pre- to the post-hook
        self.handles: list = []

    @property
    def k(self) -> int:
        return len(self.experts)

    @property
    def gate_kind(self) -> str:
        return "sigmoid" if self.gate is not None else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the graft keeps fp32 master weights on a half-precision base: compute in its own
        # dtype (autocast, when on, still picks the matmul dtype) and return the block's
        dtype = x.dtype
        branch = self._branch(x.to(self.experts[0].down_proj.weight.dtype))
        return branch.to(dtype)

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        if self.router is None:
            branch = self.experts[0](x)
        else:
            weights = torch.softmax(log_scores(self.router(x).float(), self.score), dim=-1).to(x.dtype)
            branch = sum(weights[..., j : j + 1] * mlp(x) for j, mlp in enumerate(self.experts))
        if self.output_scale != 1.0:
            branch = branch * self.output_scale
        if self.gate is not None:
            branch = torch.sigmoid(self.gate(x)) * branch
        return branch


GRAFT_CLASSES = {cls.__name__: cls for cls in (ExpertGraft,)}  # what an exported spec may name


def attach(block: nn.Module, module: nn.Module) -> nn.Module:
    """Add `module` to the MoE block as `<block>.graft`, its output added to the block's by hooks
    (every original state-dict key stays unchanged)."""
    block.add_module(GRAFT, module)
    module.handles = [
        block.register_forward_pre_hook(_stash_input, with_kwargs=True),
        block.register_forward_hook(_add_branch, with_kwargs=True),
    ]
    return module


def detach(block: nn.Module) -> None:
    """Remove the block's graft and its hooks."""
    module = getattr(block, GRAFT)
    for handle in module.handles:
        handle.remove()
    delattr(block, GRAFT)


def attach_from_spec(model: nn.Module, spec: dict) -> None:
    """Rebuild and attach the grafts an export describes: {"class": name, "layers": {block name:
    constructor args}} (the weights arrive with the model's state dict)."""
    cls = GRAFT_CLASSES[spec["class"]]
    for name, args in spec["layers"].items():
        attach(model.get_submodule(name), cls(**args))


def _stash_input(block, args, kwargs):
    module = getattr(block, GRAFT)
    if module.enabled:
        x = args[0] if args else next(iter(kwargs.values()))
        # mixtral/phimoe multiply the block input in place in train mode: keep the original
        module.pending_input = x.clone() if module.clone_input and block.training else x


def _add_branch(block, args, kwargs, output):
    module = getattr(block, GRAFT)
    x, module.pending_input = module.pending_input, None
    if not module.enabled or x is None:
        return output
    branch = module(x)
    if isinstance(output, tuple):
        return (output[0] + branch, *output[1:])
    return output + branch

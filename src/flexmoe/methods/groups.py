"""FC-MoE's aggregation groups: flat `{name: tensor}` dicts <-> one (rows, features) matrix per group.

An expert group is one MoE layer's expert-trainable tensors; its row k is expert k's piece. The
pieces are laid out as PEFT 0.21's `ParamWrapper` stores LoRA on fused (E, ·, ·) expert tensors:
`lora_A` is (E·r, in) with expert e's rows at e·r … e·r + r − 1; `lora_B` is (out, r·E) viewed as
(out, r, E), so expert e's columns are e, e + E, e + 2E, …; full fine-tuning slices the fused
tensor on dim 0. Every other trainable tensor (attention LoRA, routers) forms a one-row group per
module (its lora_A and lora_B together) or per tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from flexmoe.errors import FlexmoeError
from flexmoe.models.roles import EXPERTS
from flexmoe.tensors import Tensors

_LORA_A = re.compile(r"\.lora_A\.[^.]+\.weight$")
_LORA_B = re.compile(r"\.lora_B\.[^.]+\.weight$")
_LORA = re.compile(r"\.lora_[AB]\.[^.]+\.weight$")


@dataclass(frozen=True)
class Group:
    key: str  # the MoE layer's name prefix (expert group), or a module / tensor name
    names: tuple[str, ...]
    rows: int  # experts in an expert group, 1 otherwise

    @property
    def experts(self) -> bool:
        return expert_layer(self.names[0]) is not None


def expert_layer(name: str) -> str | None:
    """The MoE layer prefix of an expert-trainable tensor name ("...layers.0.mlp"), else None."""
    head, found, _ = name.partition(EXPERTS)
    return head if found else None


def num_experts(name: str, shape: tuple[int, ...], rank: int) -> int:
    if _LORA_A.search(name):
        return shape[0] // rank
    if _LORA_B.search(name):
        return shape[1] // rank
    return shape[0]


def to_expert_rows(name: str, tensor: torch.Tensor, experts: int) -> torch.Tensor:
    """(E, ·): row e holds expert e's piece of an expert tensor (PEFT ParamWrapper layout)."""
    if _LORA_B.search(name):
        out = tensor.shape[0]
        return tensor.reshape(out, -1, experts).permute(2, 0, 1).reshape(experts, -1)
    return tensor.reshape(experts, -1)


def from_expert_rows(name: str, rows: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `to_expert_rows`."""
    experts = rows.shape[0]
    if _LORA_B.search(name):
        out = shape[0]
        return rows.reshape(experts, out, -1).permute(1, 2, 0).reshape(shape)
    return rows.reshape(shape)


def build_groups(shapes: dict[str, tuple[int, ...]], rank: int, by: str = "module") -> list[Group]:
    """Aggregation groups of the shared tensors, in a fixed (sorted) order."""
    members: dict[str, list[str]] = {}
    for name in sorted(shapes):
        layer = expert_layer(name)
        if layer is not None:
            key = layer
        elif by == "tensor":
            key = name
        else:  # one module: lora_A with lora_B, or weight with bias
            key = _LORA.sub("", name) if _LORA.search(name) else name.rsplit(".", 1)[0]
        members.setdefault(key, []).append(name)
    groups = []
    for key, names in members.items():
        rows = {num_experts(n, shapes[n], rank) if expert_layer(n) is not None else 1 for n in names}
        if len(rows) != 1:
            raise FlexmoeError(f"expert tensors of {key} disagree on the number of experts (lora.r = {rank}?)")
        groups.append(Group(key, tuple(names), rows.pop()))
    return groups


def group_matrix(tensors: Tensors, group: Group) -> torch.Tensor:
    """The group's tensors as one float32 (rows, features) matrix."""
    parts = [to_expert_rows(n, tensors[n].float(), group.rows) if expert_layer(n) is not None
             else tensors[n].float().reshape(1, -1) for n in group.names]
    return torch.cat(parts, dim=1)


def split_matrix(matrix: torch.Tensor, group: Group, like: Tensors) -> Tensors:
    """Inverse of `group_matrix`, back to each tensor's shape and dtype."""
    out, start = {}, 0
    for name in group.names:
        ref = like[name]
        width = ref.numel() // group.rows
        piece = matrix[:, start : start + width]
        start += width
        shaped = from_expert_rows(name, piece, tuple(ref.shape)) if expert_layer(name) is not None \
            else piece.reshape(ref.shape)
        out[name] = shaped.to(ref.dtype)
    return out

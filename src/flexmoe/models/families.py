"""Where each supported Hugging Face MoE family keeps its MoE blocks, and how it routes.

transformers 5.x stores every expert of a layer in two fused 3D parameters,
`experts.gate_up_proj` (E, 2I, H, [gate; up]) and `experts.down_proj` (E, H, I), in all the
families below; what differs is the block's attribute name, the router's name, the shared
expert, the attention projections (for LoRA) and the routing rule.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from flexmoe.errors import FlexmoeError
from flexmoe.models.quantize import logical_shape  # a quantised expert's shape, without dequantising it

_STANDARD_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
# DeepSeek's multi-head latent attention: q_proj without a query LoRA rank, q_a/q_b with one.
_MLA_ATTENTION = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


@dataclasses.dataclass(frozen=True)
class Family:
    """How one model family lays out and routes its MoE blocks."""

    model_type: str
    block: str  # attribute of a decoder layer holding the MoE block
    router: str  # attribute of the block holding the router
    shared_expert: str | None  # attribute of the block holding an always-on expert
    attention: tuple[str, ...]  # attention projection module names (LoRA targets)
    score: str  # "softmax" or "sigmoid": how router logits become expert scores
    routing: str  # the family's routing rule, for humans
    jitters_in_place: bool = False  # multiplies the block input in place in train mode
    scaled: bool = False  # routed output is multiplied by config.routed_scaling_factor


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("qwen2_moe", "mlp", "gate", "shared_expert", _STANDARD_ATTENTION, "softmax",
               "softmax -> top-k (renormalised iff norm_topk_prob); + sigmoid-gated shared expert"),
        Family("qwen3_moe", "mlp", "gate", None, _STANDARD_ATTENTION, "softmax",
               "softmax -> top-k (renormalised iff norm_topk_prob)"),
        Family("mixtral", "mlp", "gate", None, _STANDARD_ATTENTION, "softmax",
               "softmax -> top-k, always renormalised; input jitter in train mode", jitters_in_place=True),
        Family("olmoe", "mlp", "gate", None, _STANDARD_ATTENTION, "softmax",
               "softmax -> top-k (renormalised iff norm_topk_prob)"),
        Family("deepseek_v2", "mlp", "gate", "shared_experts", _MLA_ATTENTION, "softmax",
               "softmax -> (group-limited) top-k, x routed_scaling_factor; + shared experts", scaled=True),
        Family("deepseek_v3", "mlp", "gate", "shared_experts", _MLA_ATTENTION, "sigmoid",
               "sigmoid + e_score_correction_bias -> group-limited top-k, weights from sigmoid "
               "(renormalised iff norm_topk_prob) x routed_scaling_factor; + shared experts", scaled=True),
        Family("granitemoe", "block_sparse_moe", "router", None, _STANDARD_ATTENTION, "softmax",
               "top-k of logits -> softmax over the k"),
        Family("phimoe", "mlp", "router", None, _STANDARD_ATTENTION, "softmax",
               "sparsemixer top-2 (sampled in train mode); input jitter in train mode", jitters_in_place=True),
    )
}


@dataclasses.dataclass(frozen=True, eq=False)
class MoELayer:
    """One MoE block of a model, with handles on its parts."""

    name: str  # qualified module name in the unwrapped transformers model, e.g. "model.layers.1.mlp"
    index: int  # decoder layer index
    block: nn.Module
    experts: nn.Module  # the module holding the fused base weights (PEFT wrappers unwrapped)
    router: nn.Module
    shared_expert: nn.Module | None
    family: Family
    top_k: int
    output_scale: float  # routed output multiplier (routed_scaling_factor, else 1)
    hidden_act: str  # the experts' activation, a transformers ACT2FN name

    @property
    def routing(self) -> str:
        return self.family.routing

    @property
    def num_experts(self) -> int:
        return self._shape("gate_up_proj")[0]

    @property
    def hidden_size(self) -> int:
        return self._shape("gate_up_proj")[2]

    @property
    def intermediate_size(self) -> int:
        return self._shape("down_proj")[2]

    def _shape(self, name: str) -> torch.Size:
        return logical_shape(self.experts, name)

    @property
    def gate_up_proj(self) -> torch.Tensor:
        return self.experts.gate_up_proj

    @property
    def down_proj(self) -> torch.Tensor:
        return self.experts.down_proj

    @property
    def act_fn(self):
        return self.experts.act_fn


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (the model itself otherwise)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def family_of(model: nn.Module) -> Family:
    """The model's MoE family; a dense or unsupported model is refused."""
    base = unwrap(model)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise FlexmoeError(
            f"{type(base).__name__} (model_type {model_type!r}) is not a supported Mixture-of-Experts "
            f"model: looked for one of {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def base_module(module: nn.Module) -> nn.Module:
    """The original module under any PEFT layer wrapped around it."""
    get_base_layer = getattr(module, "get_base_layer", None)
    return get_base_layer() if callable(get_base_layer) else module


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every MoE block of `model` (plain or PEFT-wrapped), in layer order."""
    family = family_of(model)
    base = unwrap(model)
    layers = _decoder_layers(base)
    prefix = _qualified_name(base, layers)
    found = []
    for index, layer in enumerate(layers):
        block = getattr(layer, family.block, None)
        if block is None or not hasattr(block, "experts"):
            continue  # a dense layer (deepseek's first_k_dense_replace, qwen's mlp_only_layers)
        name = f"{prefix}.{index}.{family.block}"
        found.append(_describe(name, index, block, family, base.config))
    if not found:
        raise FlexmoeError(
            f"{type(base).__name__} has no MoE layer: looked for decoder layers with "
            f"`.{family.block}.experts` (fused gate_up_proj/down_proj)"
        )
    return found


def _decoder_layers(base: nn.Module) -> nn.ModuleList:
    inner = getattr(base, "model", base)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise FlexmoeError(f"{type(base).__name__} has no decoder layers at `model.layers`")
    return layers


def _qualified_name(base: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in base.named_modules() if module is target)


def _describe(name: str, index: int, block: nn.Module, family: Family, config) -> MoELayer:
    experts = base_module(block.experts)
    router = getattr(block, family.router, None)
    _check_layout(name, experts, router, family)
    shared = getattr(block, family.shared_expert, None) if family.shared_expert else None
    top_k = getattr(router, "top_k", None) or config.num_experts_per_tok
    scale = float(getattr(config, "routed_scaling_factor", 1.0)) if family.scaled else 1.0
    return MoELayer(name, index, block, experts, base_module(router), shared, family, int(top_k), scale,
                    config.hidden_act)


def _check_layout(name: str, experts: nn.Module, router: nn.Module | None, family: Family) -> None:
    gate_up = getattr(experts, "gate_up_proj", None)
    down = getattr(experts, "down_proj", None)
    fused = isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == down.dim() == 3
    plain = not getattr(experts, "is_transposed", False) and not getattr(experts, "has_bias", False)
    plain = plain and getattr(experts, "is_concatenated", True) and getattr(experts, "has_gate", True)
    if not (fused and plain):
        raise FlexmoeError(
            f"layer {name}: unsupported expert layout (want fused, untransposed, bias-free "
            f"experts.gate_up_proj (E, 2I, H) and experts.down_proj (E, H, I))"
        )
    num_experts, two_i, hidden = gate_up.shape
    if tuple(down.shape) != (num_experts, hidden, two_i // 2):
        raise FlexmoeError(f"layer {name}: experts.down_proj has shape {tuple(down.shape)}, "
                           f"expected {(num_experts, hidden, two_i // 2)}")
    weight = getattr(base_module(router), "weight", None) if router is not None else None
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (num_experts, hidden):
        raise FlexmoeError(f"layer {name}: no router `.{family.router}` with a ({num_experts}, {hidden}) weight")

"""Frozen fused experts quantised to 4 bits (`runtime.quantize = nf4`).

transformers' bitsandbytes integration replaces `nn.Linear` modules only, and an MoE's experts
are fused 3D `nn.Parameter`s (`experts.gate_up_proj`, `experts.down_proj`): the bulk of the
model (91-97% of the shipped shapes' weights) would stay at full precision. bitsandbytes'
parametrisation route (`bitsandbytes.nn.parametrize.replace_parameter_4bit`, >= 0.48) quantises
any parameter: the stored tensor becomes packed 4-bit blocks with one fp32 absmax per block,
and every access (the experts' forward, a graft's copy) dequantises it to the base's dtype.
FLEx keeps its experts frozen, so that is all it needs; what trains (attention LoRA, the graft,
its gate) stays at fp32 master weights. Works on the CPU and on CUDA.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from flexmoe.errors import FlexmoeError

EXPERT_PARAMS = ("gate_up_proj", "down_proj")
BLOCKSIZE = 64  # bitsandbytes' 4-bit default: one fp32 absmax per 64 weights


def quantize_experts(layers: list, quant_type: str = "nf4") -> int:
    """Quantise the fused experts of `layers` (a model's `moe_layers`) in place; returns how many
    parameters it quantised."""
    try:
        from bitsandbytes.nn.parametrize import replace_parameter_4bit
    except ImportError:
        raise FlexmoeError("runtime.quantize = 'nf4' needs bitsandbytes >= 0.48: pip install 'flexmoe[quant]'") from None
    count = 0
    for layer in layers:
        for name in EXPERT_PARAMS:
            count += getattr(layer.experts, name).numel()
            replace_parameter_4bit(layer.experts, name, quant_type=quant_type, blocksize=BLOCKSIZE)
    return count


def is_quantized(module: nn.Module, name: str) -> bool:
    return parametrize.is_parametrized(module, name)


def logical_shape(module: nn.Module, name: str) -> torch.Size:
    """A parameter's shape without dequantising it (a quantised one stores packed bytes)."""
    if is_quantized(module, name):
        return torch.Size(getattr(module.parametrizations, name)[0].quant_state.shape)
    return getattr(module, name).shape


def quantized_bytes(numel: int) -> int:
    """Bytes of a 4-bit parameter: two weights a byte, and one fp32 absmax per block."""
    return -(-numel // 2) + -(-numel // BLOCKSIZE) * 4


def stored_bytes(module: nn.Module) -> int:
    """Bytes a module's quantised expert parameters hold (packed weights and their absmax)."""
    total = 0
    for name in EXPERT_PARAMS:
        if is_quantized(module, name):
            parametrization = getattr(module.parametrizations, name)
            state = parametrization[0].quant_state
            total += parametrization.original.nbytes + state.absmax.nbytes
    return total

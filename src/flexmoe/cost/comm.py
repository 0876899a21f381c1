"""Exact communication accounting without sending anything.

A message is one safetensors blob (`flexmoe.wire`); its size is `len(blob)`, headers included.
`serialized_size` computes that length from names, dtypes and shapes alone, so the same
accounting covers models too large to materialise (meta tensors).
"""

from __future__ import annotations

import json

import torch

from flexmoe.methods.base import LocalRun
from flexmoe.methods.build import build_method
from flexmoe.methods.flex.method import graft_training
from flexmoe.methods.groups import expert_layer
from flexmoe.models import apply_roles, graft, moe_layers


# ---- sizes without bytes: the same accounting for models too large to materialise ---------------

# safetensors' dtype codes in the order of its Rust `Dtype` enum; the writer lays tensors out by
# descending dtype, then by name, and each tensor's byte offsets are written into the header.
_DTYPE_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
                "F64", "I64", "U64")
_DTYPE_CODES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32", torch.float64: "F64",
    torch.int64: "I64", torch.uint64: "U64",
}


def serialized_size(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """`len(serialize(tensors, metadata))` from names, dtypes and shapes alone: works on meta tensors.

    Rebuilds the safetensors header (8-byte length, compact JSON, space-padded to 8 bytes) the
    way the library writes it; tests check it byte for byte against real messages.
    """
    order = sorted(tensors, key=lambda name: (-_DTYPE_ORDER.index(_DTYPE_CODES[tensors[name].dtype]), name))
    header: dict[str, object] = {"__metadata__": metadata} if metadata is not None else {}
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    header_len = len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    return 8 + -(-header_len // 8) * 8 + offset


def method_message_sizes(config, model: torch.nn.Module, num_examples: int = 1000,
                         measure=serialized_size) -> dict[str, int]:
    """Bytes of one round's messages per client for `config.method` on `model`, without training.

    `model` is a fresh base (meta tensors are fine: nothing is computed). It goes through the
    method's own `prepare_model`, `roles`, `downlink` and `uplink`, as the engine calls them (a
    graft of the configured k for methods that graft: which experts are grafted changes no sent
    tensor), so the tensors counted are the ones a run would send. Returns
    {"down": server -> client in round 1, "down_max": the largest downlink of any round (FC-MoE's
    grows by its consensus direction from round 2), "up": client -> server, "shared_params":
    trainable shared numel}.
    `measure(tensors, metadata)` sizes a message (`lambda t, m=None: len(serialize(t, m))` on a
    real model gives the bytes themselves).
    """
    model, method, split = prepare_like_a_client(config, model)
    shared = {name: p.detach() for name, p in split.shared.items()}
    if not method.communicates:
        return {"down": 0, "down_max": 0, "up": 0, "shared_params": sum(t.numel() for t in shared.values())}
    server_state = method.init_server_state(shared)
    down = method.downlink(shared, server_state)
    counts = _expert_counts(model, shared) if method.counts_experts else {}
    run = LocalRun(steps=1, lr=1.0, num_examples=num_examples, expert_counts=counts)
    message, _ = method.uplink(down, shared, {}, run)
    wire = config.wire  # the messages as they travel: wire.dtype / wire.quantize change their bytes
    return {
        "down": measure(_on_wire(down, wire)),
        "down_max": measure(_on_wire(method.busiest_downlink(shared), wire)),
        "up": measure(_on_wire(message, wire), {"num_examples": str(num_examples)}),
        "shared_params": sum(t.numel() for t in shared.values()),
    }


def _on_wire(tensors: dict[str, torch.Tensor], wire) -> dict[str, torch.Tensor]:
    """The message as it travels under `wire`: real tensors encoded for real, meta ones laid out."""
    from flexmoe.wire import encode, wire_layout

    if any(t.is_meta for t in tensors.values()):
        return wire_layout(tensors, wire)
    return encode(tensors, wire)[0]


def prepare_like_a_client(config, model: torch.nn.Module):
    """(model, method, split): `model` (a fresh base; meta tensors are fine) with `config.method`'s
    trainable parts and roles as a client trains it, grafted with k experts for methods that graft
    (which experts changes no tensor's shape)."""

    method = build_method(config)
    model = method.prepare_model(model)
    if method.grafts:
        flex = config.flex
        with torch.device(next(model.parameters()).device):  # meta: the graft takes no memory
            graft(model, {layer.name: list(range(flex.k)) for layer in moe_layers(model)}, gate=flex.gate,
                  gate_init_bias=flex.gate_init_bias, training=graft_training(config))
    return model, method, apply_roles(model, method.roles)


def _expert_counts(model: torch.nn.Module, shared: dict) -> dict[str, torch.Tensor]:
    """Per-expert counts of the MoE layers whose experts are shared, as local training reports them."""

    sizes = {layer.name: layer.num_experts for layer in moe_layers(model)}
    layers = {expert_layer(name) for name in shared} - {None}
    return {layer: torch.zeros(next(n for name, n in sizes.items() if layer == name or layer.endswith("." + name)))
            for layer in layers}


# Published configs (config.json on the Hugging Face hub) of real MoE checkpoints: only the
# fields that decide parameter shapes. Built on the meta device, they hold no weights.
REAL_SHAPES: dict[str, tuple[str, dict]] = {
    "Qwen1.5-MoE-A2.7B": ("qwen2_moe", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
        num_attention_heads=16, num_key_value_heads=16, num_experts=60, num_experts_per_tok=4,
        moe_intermediate_size=1408, shared_expert_intermediate_size=5632, max_position_embeddings=8192,
        tie_word_embeddings=False)),
    "OLMoE-1B-7B": ("olmoe", dict(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
        max_position_embeddings=4096, tie_word_embeddings=False)),
    "Mixtral-8x7B": ("mixtral", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=32768, tie_word_embeddings=False)),
}


def meta_model(model_type: str, dtype: torch.dtype = torch.float32, **config_fields) -> torch.nn.Module:
    """A causal LM of `model_type` with the given config fields on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **config_fields)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def real_shape_model(name: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """One of `REAL_SHAPES` on the meta device."""
    model_type, fields = REAL_SHAPES[name]
    return meta_model(model_type, dtype=dtype, **fields)

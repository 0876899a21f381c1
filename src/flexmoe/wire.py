"""The wire format: everything that travels between server and clients is one safetensors blob
(tensors plus string metadata). The in-process engine sends these bytes and counts `len(blob)`,
exactly what is serialised, headers included (`flexmoe.cost.comm` computes the same length
without the bytes)."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load, save


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """One message as bytes; tensors are made contiguous CPU copies (safetensors requires it)."""
    flat = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    return save(flat, metadata=metadata)


def deserialize(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Inverse of `serialize`: (tensors, metadata)."""
    tensors = load(blob)
    header_len = int.from_bytes(blob[:8], "little")  # safetensors layout: u64 header size, JSON header
    header = json.loads(blob[8 : 8 + header_len])
    return tensors, header.get("__metadata__", {})


# ---- compressed messages (`[wire]`) ------------------------------------------------------------
# A floating-point tensor `name` travels under a key that says how: "bf16:name" (bfloat16 bits as
# int16, which Flower's ArrayRecord accepts), "fp16:name", or "int8:name" with its per-row float32
# scales under "scale:name". Other tensors (and everything at wire.dtype = fp32) travel as they are.
# Parameter names hold no ':', so the prefixes cannot collide with them.
BF16, FP16, INT8, SCALE = "bf16:", "fp16:", "int8:", "scale:"
_CODED = (BF16, FP16, INT8)


class WireError(ValueError):
    """A message that cannot be decoded (a quantised tensor without its scales, shapes that disagree)."""


def encode(tensors: dict[str, torch.Tensor], wire, reference: dict[str, torch.Tensor] | None = None,
           residual: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the wire form of `tensors` under `wire` (a `WireConfig`), the new rounding residuals).

    A floating tensor whose name is in `reference` travels as its difference from it (the uplink's
    shared weights minus what the client received: the rounding then falls on the update, not on the
    weights). With `residual` (error feedback), each value sent is the tensor plus last round's
    rounding error of the same name, and the new residuals are what this rounding lost."""
    if not wire.lossy:
        return tensors, {}
    reference = reference or {}
    out, kept = {}, {}
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            out[name] = tensor
            continue
        value = tensor.detach().cpu().float()
        if name in reference:
            value = value - reference[name].float()
        if residual is not None:
            value = value + residual.get(name, torch.zeros_like(value))
        coded = _encode_one(name, value, wire)
        out.update(coded)
        if residual is not None:
            kept[name] = value - _decode_one(name, coded)
    return out, kept


def decode(tensors: dict[str, torch.Tensor], reference: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Inverse of `encode` (float32 for every coded tensor); raises `WireError` on a malformed message."""
    reference = reference or {}
    out = {}
    for key, tensor in tensors.items():
        if key.startswith(SCALE):
            if INT8 + key[len(SCALE):] not in tensors:
                raise WireError(f"scales {key!r} without their int8 tensor")
            continue
        prefix = next((p for p in _CODED if key.startswith(p)), None)
        if prefix is None:
            out[key] = tensor
            continue
        name = key[len(prefix):]
        value = _decode_one(name, tensors)
        if name in reference:
            if tuple(reference[name].shape) != tuple(value.shape):
                raise WireError(f"{name!r} has shape {tuple(value.shape)}, the reference {tuple(reference[name].shape)}")
            value = reference[name].float() + value
        out[name] = value
    return out


def wire_layout(tensors: dict[str, torch.Tensor], wire) -> dict[str, torch.Tensor]:
    """Meta tensors with the names, dtypes and shapes `encode(tensors, wire)` sends: sizes a message
    (`flexmoe.cost.comm.serialized_size`) without its values, also for meta models (`flexmoe plan`)."""
    if not wire.lossy:
        return tensors
    out = {}
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            out[name] = tensor
        elif wire.quantize == "int8":
            rows = tensor.shape[0] if tensor.dim() >= 2 else 1
            out[INT8 + name] = torch.empty(tensor.shape, dtype=torch.int8, device="meta")
            out[SCALE + name] = torch.empty(rows, dtype=torch.float32, device="meta")
        else:
            out[(BF16 if wire.dtype == "bf16" else FP16) + name] = torch.empty(
                tensor.shape, dtype=torch.int16 if wire.dtype == "bf16" else torch.float16, device="meta")
    return out


def _encode_one(name: str, value: torch.Tensor, wire) -> dict[str, torch.Tensor]:
    if wire.quantize == "int8":
        rows = value.reshape(value.shape[0] if value.dim() >= 2 else 1, -1)
        scale = rows.abs().amax(dim=1) / 127.0
        q = torch.where(scale[:, None] > 0, rows / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None], 0.0)
        return {INT8 + name: q.round().clamp(-127, 127).to(torch.int8).reshape(value.shape), SCALE + name: scale}
    if wire.dtype == "bf16":
        return {BF16 + name: value.to(torch.bfloat16).view(torch.int16)}
    return {FP16 + name: value.to(torch.float16)}


def _decode_one(name: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    if BF16 + name in tensors:
        bits = tensors[BF16 + name]
        if bits.dtype != torch.int16:
            raise WireError(f"{BF16 + name!r} must be int16 bits, not {bits.dtype}")
        return bits.view(torch.bfloat16).float()
    if FP16 + name in tensors:
        return tensors[FP16 + name].float()
    q, scale = tensors[INT8 + name], tensors.get(SCALE + name)
    if scale is None:
        raise WireError(f"int8 tensor {name!r} arrived without its scales")
    rows = q.shape[0] if q.dim() >= 2 else 1
    if q.dtype != torch.int8 or tuple(scale.shape) != (rows,):
        raise WireError(f"int8 tensor {name!r}: dtype {q.dtype}, scales of shape {tuple(scale.shape)} for {rows} rows")
    return (q.float().reshape(rows, -1) * scale.float()[:, None]).reshape(q.shape)

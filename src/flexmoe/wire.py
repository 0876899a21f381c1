"""The wire format: everything that travels between server and clients is one safetensors blob
(tensors plus string metadata). The in-process engine sends these bytes and counts `len(blob)`,
exactly what is serialised, headers included (`flexmoe.eval.comm` computes the same length
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

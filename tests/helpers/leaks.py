"""Whether personal tensors appear in the bytes a client sent: by key, by whole-tensor hash, or row by row."""

from __future__ import annotations

import hashlib

import torch

from flexmoe.wire import deserialize

MIN_ROW_BYTES = 32  # rows shorter than 8 float32 values could match sent bytes by chance


def raw(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def informative(tensor: torch.Tensor) -> bool:
    """Constant values (a zero-initialised gate weight, like LoRA's zero B) reveal nothing and
    match any other constant tensor of their size: only the others are fingerprinted."""
    return tensor.numel() > 1 and not bool((tensor == tensor.reshape(-1)[0]).all())


def leaks(personal: dict[str, torch.Tensor], blobs: list[bytes]) -> list[str]:
    """Personal tensors found in sent blobs: by key; by the sha256 of a whole tensor's bytes;
    or any row of one (last dimension, at least MIN_ROW_BYTES) anywhere in a blob's raw bytes."""
    found = []
    sent_hashes = set()
    for blob in blobs:
        tensors, _ = deserialize(blob)
        found += [f"key {k}" for k in tensors if k in personal or "graft" in k.split(".")]
        sent_hashes |= {hashlib.sha256(raw(t)).digest() for t in tensors.values() if t.numel()}
    for name, tensor in personal.items():
        if not informative(tensor):
            continue
        if hashlib.sha256(raw(tensor)).digest() in sent_hashes:
            found.append(f"value {name}")
        for index, row in enumerate(tensor.reshape(-1, tensor.shape[-1])):
            row_bytes = raw(row)
            if len(row_bytes) >= MIN_ROW_BYTES and informative(row) and any(row_bytes in blob for blob in blobs):
                found.append(f"row {index} of {name}")
    return found

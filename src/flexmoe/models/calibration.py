"""Calibration capture for expert selection: a seeded uniform sample of each MoE block's inputs
and routed outputs (or its router's choices) on a client's calibration batches, the base in eval
mode with any graft disabled."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import nn

from flexmoe.data.tokens import IGNORE_INDEX
from flexmoe.errors import FlexmoeError
from flexmoe.models.families import unwrap
from flexmoe.models.graft import grafts_disabled


@dataclasses.dataclass
class _LayerCapture:
    """A uniform sample (without replacement) of at most `cap` tokens, kept by smallest random key."""

    cap: int
    generator: torch.Generator
    num_experts: int
    x: torch.Tensor | None = None
    r: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    counts: torch.Tensor | None = None

    def add_tokens(self, x: torch.Tensor, r: torch.Tensor) -> None:
        keys = torch.rand(len(x), generator=self.generator)
        x, r = x.detach().float().cpu(), r.detach().float().cpu()
        if self.x is not None:
            x, r, keys = torch.cat([self.x, x]), torch.cat([self.r, r]), torch.cat([self.keys, keys])
        if len(keys) > self.cap:
            keep = torch.sort(torch.topk(keys, self.cap, largest=False).indices).values
            x, r, keys = x[keep], r[keep], keys[keep]
        self.x, self.r, self.keys = x, r, keys

    def add_choices(self, indices: torch.Tensor) -> None:
        counts = torch.bincount(indices.reshape(-1).cpu(), minlength=self.num_experts)
        self.counts = counts if self.counts is None else self.counts + counts


def capture_calibration(model, layers, batches, max_tokens, seed, want_tokens: bool) -> dict[str, _LayerCapture]:
    captures = {
        layer.name: _LayerCapture(max_tokens, torch.Generator().manual_seed(seed * 1_000_003 + layer.index),
                                  layer.num_experts)
        for layer in layers
    }
    valid: list[torch.Tensor | None] = [None]  # flattened calibration-token mask of the current batch
    handles = []
    for layer in layers:
        capture = captures[layer.name]
        if want_tokens:
            handles.append(layer.block.experts.register_forward_hook(_token_hook(capture, valid), with_kwargs=True))
        else:
            handles.append(layer.block.get_submodule(layer.family.router).register_forward_hook(
                _router_hook(capture, valid, layer.name)))
    device = next(unwrap(model).parameters()).device
    decoder = unwrap(model).get_decoder()  # the LM head's vocabulary-sized logits are not needed here
    seen = 0
    try:
        with torch.no_grad(), _eval_mode(model), grafts_disabled(model):
            for input_ids, attention_mask, calibration in _iter_batches(batches):
                valid[0] = None if calibration is None else calibration.reshape(-1).to(device)
                decoder(input_ids=input_ids.to(device),
                        attention_mask=None if attention_mask is None else attention_mask.to(device), use_cache=False)
                seen += int(input_ids.numel() if calibration is None else calibration.sum())
    finally:
        for handle in handles:
            handle.remove()
    if seen == 0:
        raise FlexmoeError("no tokens to select experts from: the calibration batches are empty")
    return captures


def _token_hook(capture: _LayerCapture, valid):
    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        routed = output[0] if isinstance(output, tuple) else output
        mask = valid[0]
        if mask is not None:
            x, routed = x[mask], routed[mask]
        capture.add_tokens(x, routed)

    return hook


def _router_hook(capture: _LayerCapture, valid, layer_name: str):
    def hook(module, args, output):
        # transformers 5 routers return (logits, weights, indices): the integer tensor is the true
        # choice (deepseek_v3 adds a bias before its top-k, so the top-k of the logits is not)
        chosen = [t for t in output if isinstance(t, torch.Tensor) and not t.is_floating_point()] \
            if isinstance(output, tuple) else []
        if not chosen:
            raise FlexmoeError(f"layer {layer_name}: the router returned no expert indices "
                               "(expected a (logits, weights, indices) tuple)")
        indices = chosen[0].reshape(-1, chosen[0].shape[-1])
        mask = valid[0]
        if mask is not None:
            indices = indices[mask]
        capture.add_choices(indices)

    return hook


def _iter_batches(batches) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
    """(input_ids, attention_mask, calibration mask) per batch. Calibration tokens are the
    non-padding ones, and of those only the supervised ones (labels != IGNORE_INDEX) when the batch
    carries labels: the prompt template is the same for every client and would blur the choice."""
    for position, batch in enumerate(batches):
        batch = dict(batch) if isinstance(batch, dict) else {"input_ids": batch}
        if "input_ids" not in batch:
            raise FlexmoeError(f"calibration batch {position} has no 'input_ids'")
        tensors = {key: torch.as_tensor(batch[key]) for key in ("input_ids", "attention_mask", "labels")
                   if batch.get(key) is not None}
        tensors = {key: t.unsqueeze(0) if t.dim() == 1 else t for key, t in tensors.items()}
        input_ids = tensors["input_ids"]
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise FlexmoeError(f"calibration batch {position}: expected integer token ids of shape (batch, length), "
                               f"got {input_ids.dtype} {tuple(input_ids.shape)}")
        for key in ("attention_mask", "labels"):
            if key in tensors and tensors[key].shape != input_ids.shape:
                raise FlexmoeError(f"calibration batch {position}: {key} has shape {tuple(tensors[key].shape)}, "
                                   f"input_ids {tuple(input_ids.shape)}")
        attention_mask = tensors.get("attention_mask")
        calibration = None if attention_mask is None else attention_mask.bool()
        if "labels" in tensors:
            supervised = tensors["labels"] != IGNORE_INDEX
            calibration = supervised if calibration is None else calibration & supervised
        if input_ids.numel():
            yield input_ids.long(), attention_mask, calibration


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    # routed targets are taken in eval mode: no jitter, no sampled routing (phimoe)
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)

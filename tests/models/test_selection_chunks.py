"""Grafting selection at many experts: the chunking over experts bounds the selection's peak tensor
memory whatever the expert count, also with few calibration tokens from a half-precision base (whose
chunk of expert weights is copied to fp32), and chunked losses equal a per-expert brute force."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from flexmoe.models.selection import greedy_reconstruction
from flexmoe.cost.memory import TensorMemory

selection_module = importlib.import_module("flexmoe.models.selection")


def bf16_layer(experts: int, hidden: int = 64, width: int = 32):
    """A Qwen2-MoE block of `experts` experts, random bf16 weights, as an flexmoe MoELayer."""
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    from flexmoe.models.families import FAMILIES, MoELayer

    config = Qwen2MoeConfig(hidden_size=hidden, moe_intermediate_size=width, num_experts=experts,
                            num_experts_per_tok=2, shared_expert_intermediate_size=8, norm_topk_prob=False)
    torch.manual_seed(experts)
    block = Qwen2MoeSparseMoeBlock(config).to(torch.bfloat16).requires_grad_(False)
    for param in block.parameters():
        param.normal_(0, 0.1)
    return MoELayer("model.layers.0.mlp", 0, block, block.experts, block.gate, block.shared_expert,
                    FAMILIES["qwen2_moe"], 2, 1.0, "silu")


def brute_force_losses(layer, x, r):
    losses = []
    for e in range(layer.num_experts):
        gate, up = F.linear(x, layer.gate_up_proj[e].float()).chunk(2, dim=-1)
        out = F.linear(layer.act_fn(gate) * up, layer.down_proj[e].float())
        losses.append(((r - out) ** 2).sum(-1).mean())
    return torch.stack(losses)


def selection_peak(experts: int, tokens: int = 4):
    layer = bf16_layer(experts)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, layer.hidden_size, generator=generator)
    r = torch.randn(tokens, layer.hidden_size, generator=generator)
    with TensorMemory() as counter:
        chosen, losses = greedy_reconstruction(layer, x, r, k=1)
    reference = brute_force_losses(layer, x, r)
    assert chosen == [int(reference.argmin())]
    torch.testing.assert_close(losses[0], reference, rtol=1e-5, atol=1e-6)
    return counter.peak


def test_selection_peak_does_not_grow_with_the_expert_count(monkeypatch):
    """A budget of 4,096 elements per chunk: 4 tokens' activations of an expert are 256 of them and its
    fp32 weights 6,144, so a chunk holds one expert. Counting the activations only, 16 experts fitted a
    chunk, and at 64 experts the selection held twice the fp32 weights it held at 8."""
    monkeypatch.setattr(selection_module, "_CHUNK_ELEMENTS", 4096)
    few, many = selection_peak(8), selection_peak(64)
    one_expert = 3 * 32 * 64 * 4  # an expert's fp32 copy, in bytes
    assert many < few + one_expert / 2, (few, many)  # only the (T, E) scores and (E,) losses grow, by bytes


@pytest.mark.parametrize("tokens", [1, 4, 300])
def test_chunks_cover_every_expert_once(tokens):
    layer = bf16_layer(60)
    chunks = list(selection_module._expert_chunks(layer, tokens, copies=True))
    assert [e for start, stop in chunks for e in range(start, stop)] == list(range(60))
    per_expert = tokens * 2 * 32 + 3 * 32 * 64
    assert all(stop - start <= max(1, selection_module._CHUNK_ELEMENTS // per_expert) for start, stop in chunks)

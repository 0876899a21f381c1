"""Expert-selection cost: against one client's local round on the tiny base, and for one
Qwen1.5-MoE-A2.7B-shaped layer vectorised over experts vs a loop.

Against a local round: client 0 of the default FLEx run selects its experts (calibration batches
as the engine builds them: 32 examples, supervised tokens only) and trains one default local
round (10 steps of batch 8), in CPU seconds of this process, medians of 3 alternating repeats.

The layer has 60 experts, hidden size 2048, expert intermediate size 1408 and top-4 routing,
with random weights. Both methods compute every expert's reconstruction loss
||R - E_e(X)||^2 on the same tokens (R = the layer's routed output): `vectorised` is
flexmoe's `greedy_reconstruction` (batched matmuls on the fused 3D weights, chunked over
experts), `loop` slices one expert at a time and runs two linears. Times are per 1,000 tokens:
CPU seconds of this process (robust to other processes sharing the machine) and wall seconds.

At real expert counts: one layer's selection (`greedy_reconstruction`, k = 1) at 8, 60, 64 and
128 experts, first at fixed widths (Qwen1.5-MoE-A2.7B's hidden 2048 and expert width 1408) so that
only the count changes, then at each shipped shape's own widths. Experts are stored in bf16, as a
bf16 base holds them. Per layer: CPU and wall seconds, CPU seconds per expert (constant if the
time is linear in the count) and the peak of the tensor bytes the selection creates
(`TensorMemory`: the fp32 chunk of expert weights and its activations), at 64 and 256 calibration
tokens. The chunking (`flexmoe.models.selection._expert_chunks`) bounds that peak by a fixed budget
or one expert, whichever is larger, whatever the count; the captured inputs and routed outputs
(2 x tokens x hidden fp32 per layer) come on top.

`python -m benchmarks selection`; `FLEXMOE_SELECTION=scale` runs the expert-count part only.
"""

from __future__ import annotations

import os
import pathlib
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.machine import header_markdown, run_with_threads, write_result

NUM_EXPERTS, HIDDEN, INTERMEDIATE, TOP_K = 60, 2048, 1408, 4
TOKEN_COUNTS = (32, 256)  # a small calibration batch, where per-expert matmuls are small, and a larger one
REPEATS = 3
# One intra-op thread: on a shared machine, spinning OpenMP workers waiting for a busy core
# distort multi-threaded timings far more than the work itself.
THREADS = 1


def qwen15_moe_layer(seed: int = 0):
    """One Qwen2-MoE sparse block shaped like Qwen1.5-MoE-A2.7B, random weights, as an flexmoe MoELayer."""
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    from flexmoe.models.families import FAMILIES, MoELayer

    config = Qwen2MoeConfig(hidden_size=HIDDEN, moe_intermediate_size=INTERMEDIATE, num_experts=NUM_EXPERTS,
                            num_experts_per_tok=TOP_K, shared_expert_intermediate_size=4 * INTERMEDIATE,
                            norm_topk_prob=False)
    config._experts_implementation = "grouped_mm"  # transformers' default, for the routed output R
    torch.manual_seed(seed)
    block = Qwen2MoeSparseMoeBlock(config).requires_grad_(False)
    for param in block.parameters():
        param.normal_(0, 0.02)
    return MoELayer("model.layers.0.mlp", 0, block, block.experts, block.gate, block.shared_expert,
                    FAMILIES["qwen2_moe"], TOP_K, 1.0, "silu")


def routed_output(layer, x: torch.Tensor) -> torch.Tensor:
    _, weights, indices = layer.router(x)
    return layer.block.experts(x, indices, weights)


@torch.no_grad()
def loop_losses(layer, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    losses = torch.empty(layer.num_experts)
    for e in range(layer.num_experts):
        gate, up = F.linear(x, layer.gate_up_proj[e]).chunk(2, dim=-1)
        out = F.linear(layer.act_fn(gate) * up, layer.down_proj[e])
        losses[e] = ((r - out) ** 2).sum(-1).mean()
    return losses


def vectorised_losses(layer, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    from flexmoe.models.selection import greedy_reconstruction

    return greedy_reconstruction(layer, x, r, k=1)[1][0]


def timed(fn, *args) -> tuple[float, float, torch.Tensor]:
    """(CPU seconds, wall seconds, result)."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn(*args)
    return time.process_time() - cpu, time.perf_counter() - wall, result


def main(results_dir: pathlib.Path) -> None:
    run_with_threads(THREADS, _run, results_dir)


SCALE_COUNTS = (8, 60, 64, 128)
SCALE_TOKENS = (64, 256)
# (label, experts, hidden, expert width, top-k) of the shipped shapes (flexmoe.shapes)
SHAPE_LAYERS = (("mixtral-8x7b", 8, 4096, 14336, 2), ("qwen1.5-moe-a2.7b", 60, 2048, 1408, 4),
                ("olmoe-1b-7b", 64, 2048, 1024, 8), ("qwen3-30b-a3b", 128, 2048, 768, 8))


def moe_layer(experts: int, hidden: int, width: int, top_k: int, dtype=torch.bfloat16, seed: int = 0):
    """A Qwen2-MoE sparse block of the given widths, random weights in `dtype`, as an flexmoe MoELayer."""
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    from flexmoe.models.families import FAMILIES, MoELayer

    config = Qwen2MoeConfig(hidden_size=hidden, moe_intermediate_size=width, num_experts=experts,
                            num_experts_per_tok=top_k, shared_expert_intermediate_size=8, norm_topk_prob=False)
    config._experts_implementation = "grouped_mm"
    torch.manual_seed(seed)
    with torch.device("meta"):
        block = Qwen2MoeSparseMoeBlock(config)
    block = block.to(dtype).to_empty(device="cpu").requires_grad_(False)  # bf16 from the start: no fp32 copy
    for param in block.parameters():
        param.normal_(0, 0.02)
    return MoELayer("model.layers.0.mlp", 0, block, block.experts, block.gate, block.shared_expert,
                    FAMILIES["qwen2_moe"], top_k, 1.0, "silu")


def scale_row(label: str, layer, tokens: int) -> str:
    from flexmoe.models.selection import greedy_reconstruction
    from flexmoe.cost.memory import TensorMemory

    generator = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, layer.hidden_size, generator=generator).to(layer.gate_up_proj.dtype)
    with torch.no_grad():
        r = routed_output(layer, x).float()
    x = x.float()
    with TensorMemory() as counter:
        cpu, wall, _ = timed(greedy_reconstruction, layer, x, r, 1)
    captured = 2 * x.nbytes
    return (f"| {label} | {layer.num_experts} | {layer.hidden_size} | {layer.intermediate_size} | {tokens} | "
            f"{cpu:.2f} | {wall:.2f} | {1000 * cpu / layer.num_experts:.1f} | {counter.peak / 2**20:,.1f} | "
            f"{captured / 2**20:,.1f} |")


def _at_expert_counts() -> list[str]:
    lines = ["| layer | experts | hidden | expert width | tokens | CPU s | wall s | CPU ms per expert | "
             "peak selection tensors (MiB) | captured x and r (MiB) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for experts in SCALE_COUNTS:
        layer = moe_layer(experts, 2048, 1408, min(4, experts - 1))
        lines += [scale_row("fixed widths", layer, tokens) for tokens in SCALE_TOKENS]
        del layer
    for label, experts, hidden, width, top_k in SHAPE_LAYERS:
        layer = moe_layer(experts, hidden, width, top_k)
        lines += [scale_row(label, layer, tokens) for tokens in SCALE_TOKENS]
        del layer
    return lines


def _scale_only(results_dir: pathlib.Path) -> None:
    lines = [header_markdown("Expert selection at real expert counts",
                             "FLEXMOE_SELECTION=scale python -m benchmarks selection"),
             __doc__.split("\n\n")[-2].strip(), "", *_at_expert_counts(), "",
             f"Load average when done: {os.getloadavg()[0]:.1f} (shared machine: CPU seconds are the comparable "
             "figure).", ""]
    write_result(results_dir, "selection", lines)


def _run(results_dir: pathlib.Path) -> None:
    if os.environ.get("FLEXMOE_SELECTION") == "scale":
        return _scale_only(results_dir)
    layer = qwen15_moe_layer()
    generator = torch.Generator().manual_seed(1)
    lines = [
        header_markdown("Expert selection: vectorised vs per-expert loop",
                        "nice -n 5 .venv/bin/python -m benchmarks selection"),
        f"Layer: {NUM_EXPERTS} experts, hidden {HIDDEN}, expert intermediate {INTERMEDIATE}, top-{TOP_K} "
        f"(Qwen1.5-MoE-A2.7B shape), random weights, fp32, k=1, {REPEATS} alternating repeats, "
        f"{THREADS} intra-op thread. Times are medians per 1,000 tokens.",
        "",
        "| tokens | method | CPU s / 1k tokens | wall s / 1k tokens | same losses and expert |",
        "|---:|---|---:|---:|---|",
    ]
    with torch.no_grad():
        warm = torch.randn(16, HIDDEN, generator=generator)
        vectorised_losses(layer, warm, routed_output(layer, warm))  # first-call allocations
        loop_losses(layer, warm, routed_output(layer, warm))
    for tokens in TOKEN_COUNTS:
        x = torch.randn(tokens, HIDDEN, generator=generator)
        with torch.no_grad():
            r = routed_output(layer, x)
        lines += _compare(layer, x, r)
    lines += ["", "## Selection vs one local round (tiny base, FLEx, client 0)", "", *_selection_vs_round()]
    lines += ["", "## At real expert counts", "", __doc__.split("\n\n")[-2].strip(), "", *_at_expert_counts()]
    lines += ["", f"Load average when done: {os.getloadavg()[0]:.1f} (the machine was shared with other jobs; "
              "CPU seconds are the comparable figure).", ""]
    write_result(results_dir, "selection", lines)


SELECTION_TARGET = 0.05  # selection <= 5% of one local round


def _selection_vs_round() -> list[str]:
    from benchmarks.bench_fastpaths import child
    from flexmoe.config import TrainConfig

    steps = TrainConfig().local_steps
    times = child(THREADS, steps)
    selection = times["selection"][0]
    lines = ["| work | CPU s | wall s |", "|---|---:|---:|",
             f"| expert selection | {selection:.3f} | {times['selection'][1]:.3f} |"]
    for precision in ("fp32", "bf16"):
        cpu, wall = times[f"round {precision}"]
        lines.append(f"| local round, {steps} steps, {precision} | {cpu:.3f} | {wall:.3f} |")
    for precision in ("fp32", "bf16"):
        ratio = selection / times[f"round {precision}"][0]
        lines.append("")
        lines.append(f"Selection / one {precision} local round: {ratio:.1%} (target <= {SELECTION_TARGET:.0%}: "
                     f"{'met' if ratio <= SELECTION_TARGET else 'missed'}).")
    return lines


def _compare(layer, x: torch.Tensor, r: torch.Tensor) -> list[str]:
    # alternate the two methods so that load from other processes hits both alike
    times = {"vectorised": [], "loop": []}
    for _ in range(REPEATS):
        *vec_time, vec = timed(vectorised_losses, layer, x, r)
        *loop_time, ref = timed(loop_losses, layer, x, r)
        times["vectorised"].append(vec_time)
        times["loop"].append(loop_time)
    agree = bool(torch.argmin(vec) == torch.argmin(ref)) and torch.allclose(vec, ref, rtol=1e-4)
    per_1k = 1000 / len(x)
    rows = []
    for method, runs in times.items():
        cpu = statistics.median(t[0] for t in runs) * per_1k
        wall = statistics.median(t[1] for t in runs) * per_1k
        rows.append(f"| {len(x)} | {method} | {cpu:.2f} | {wall:.2f} | {agree} |")
    return rows

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
                    FAMILIES["qwen2_moe"], TOP_K, 1.0)


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


def _run(results_dir: pathlib.Path) -> None:
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

"""Expert compute in local training: transformers' grouped matmul vs its per-expert loop.

transformers 5.23 runs the fused 3D experts of every supported family with `grouped_mm` by
default (one grouped matmul over the tokens sorted by expert, only the routed rows); `eager`
loops over the experts hit and runs two linears each. grouped_mm is not autocast-enabled
(transformers runs it in the weights' dtype), so under bf16 autocast the experts stay fp32;
the last row holds the frozen expert weights in bf16 instead. Both train FLEx on the tiny base here
(client 0, default train config, 4 steps), switched on the same model with
`set_experts_implementation`, alternating, 4 repeats after a warm-up round; CPU seconds
of this process with one intra-op thread.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import statistics

import torch

from benchmarks.machine import header_markdown, write_result

IMPLEMENTATIONS = ("grouped_mm", "eager")
BF16_WEIGHTS = "grouped_mm, frozen experts stored in bf16"  # bf16 only: grouped_mm is not autocast-enabled
PRECISIONS = ("fp32", "bf16")
STEPS = 4
REPEATS = 4
COMMAND = ".venv/bin/python -m benchmarks experts"


def main(results_dir: pathlib.Path) -> None:
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run(results_dir)
    finally:
        torch.set_num_threads(previous_threads)


@contextlib.contextmanager
def experts_in_bf16(model):
    """The frozen fused expert weights held in bf16 for the duration (restored exactly after)."""
    from flexmoe.models import moe_layers

    experts = [layer.block.experts for layer in moe_layers(model)]
    saved = [(e.gate_up_proj.data, e.down_proj.data) for e in experts]
    for e in experts:
        e.gate_up_proj.data, e.down_proj.data = e.gate_up_proj.data.bfloat16(), e.down_proj.data.bfloat16()
    try:
        yield
    finally:
        for e, (gate_up, down) in zip(experts, saved):
            e.gate_up_proj.data, e.down_proj.data = gate_up, down


def _run(results_dir: pathlib.Path) -> None:
    from benchmarks.bench_train import METHODS, Setup
    from flexmoe.models.families import unwrap

    setup = Setup(dict(METHODS)["flex"])
    times: dict[tuple[str, str], list[float]] = {}
    for repeat in range(REPEATS + 1):
        for implementation in IMPLEMENTATIONS:
            unwrap(setup.model).set_experts_implementation(implementation)
            for precision in PRECISIONS:
                cpu = setup.train(precision, STEPS)[0]
                if repeat:  # the first pass is the warm-up
                    times.setdefault((implementation, precision), []).append(cpu)
        unwrap(setup.model).set_experts_implementation("grouped_mm")
        with experts_in_bf16(setup.model):
            cpu = setup.train("bf16", STEPS)[0]
        if repeat:
            times.setdefault((BF16_WEIGHTS, "bf16"), []).append(cpu)
    lines = [header_markdown("Expert compute: grouped_mm vs per-expert loop (FLEx, tiny base)", COMMAND),
             __doc__.split("\n\n", 1)[1].strip(), "",
             "| experts | precision | median CPU s per round | all repeats |", "|---|---|---:|---|"]
    medians = {}
    for (implementation, precision), samples in times.items():
        medians[(implementation, precision)] = statistics.median(samples)
        lines.append(f"| {implementation} | {precision} | {medians[(implementation, precision)]:.3f} | "
                     f"{', '.join(f'{s:.3f}' for s in samples)} |")
    lines += ["", "eager / grouped_mm time: " + ", ".join(
        f"{p} {medians[('eager', p)] / medians[('grouped_mm', p)]:.2f}x" for p in PRECISIONS) + "; "
        f"bf16 expert weights / fp32 expert weights under bf16 autocast: "
        f"{medians[(BF16_WEIGHTS, 'bf16')] / medians[('grouped_mm', 'bf16')]:.2f}x.", "",
        f"Load average when done: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared machine).", ""]
    write_result(results_dir, "experts", lines)

"""Local training throughput and MFU on the shipped tiny base: FLEx and the FedAvg baselines, fp32 and bf16.

Each method's model is built by the engine's own code (`load_model`, and for FLEx the client's
one-shot graft through `ClientRunner.graft`) on client 0 of the default run, and trained by
`local_train` with the default train config (batch 8, max length 256), for the steps per timed
round given below, after a one-step warm-up. Model FLOPs are the matmul FLOPs that one such round executes,
counted by torch's FlopCounterMode over the real forward and backward (`flexmoe.cost.flops`:
with LoRA, frozen weights get no weight gradient, so a step costs ~2x the forward, not 3x).
MFU = those FLOPs / time / the matmul peak of the same precision, measured in this run with a
large torch.matmul. Times are CPU seconds of this process (one intra-op thread, so CPU seconds
are core-seconds and robust to other processes on the shared machine) and wall seconds.
Tokens are the non-padding input tokens of the batches. The bf16 loss check trains FLEx for
the steps given below from the same seed in fp32 and bf16, for several seeds, and compares the
bf16-vs-fp32 gap with the fp32 seed-to-seed spread.
"""

from __future__ import annotations

import os
import pathlib
import statistics
import tempfile
import time

import torch

from benchmarks.machine import header_markdown, run_with_threads, write_result

METHODS = (
    ("flex", ["method=flex"]),
    ("fedavg, LoRA attention", ["method=fedavg", "lora.scope=attention"]),
    ("fedavg, LoRA attention+experts", ["method=fedavg", "lora.scope=attention+experts"]),
    ("fedavg, full", ["method=fedavg", "lora.scope=full"]),
)
PRECISIONS = ("fp32", "bf16")
STEPS = 6
REPEATS = 3
CURVE_STEPS = 30
CURVE_WINDOW = 10  # the curves are compared on the mean loss of their last steps
SEEDS = (0, 1, 2)
THREADS = 1
PEAK_SIZE = 2048
COMMAND = "nice -n 5 .venv/bin/python -m benchmarks train"


class CountingCollate:
    """The engine's collate, counting the non-padding tokens and all positions it hands out."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id
        self.tokens = self.positions = 0

    def __call__(self, features):
        from flexmoe.data import collate

        batch = collate(features, self.pad_token_id)
        self.tokens += int(batch["attention_mask"].sum())
        self.positions += batch["attention_mask"].numel()
        return batch


class Setup:
    """One method's model on client 0, ready for `local_train` (grafted for FLEx)."""

    def __init__(self, overrides: list[str], seed: int = 0):
        from flexmoe.config import load_config
        from flexmoe.clients import make_client, partition_data
        from flexmoe.engine.client import ClientRunner
        from flexmoe.engine.model import load_model
        from flexmoe.models import split_parameters
        from flexmoe.rundir import ClientStore
        from flexmoe.methods.build import build_method

        self.config = load_config(None, [*overrides, f"seed={seed}"])
        method = build_method(self.config)
        self.model, tokenizer = load_model(self.config, method)
        self.pad_token_id = tokenizer.pad_token_id
        client = make_client(self.config, partition_data(self.config)[0], tokenizer)
        self.features = client.features
        if method.grafts:
            with tempfile.TemporaryDirectory() as store:
                runner = ClientRunner(self.config, method, self.model, tokenizer, ClientStore(pathlib.Path(store)),
                                      initial_shared=dict)
                runner.graft(client)
        self.params = split_parameters(self.model, method.roles).trainable

    def train(self, precision: str, steps: int, seed: int = 1, on_step=None):
        """(CPU s, wall s, non-padding tokens, positions, per-step losses) of one local round."""
        from flexmoe.train import local_train

        config = self.config.train.model_copy(update={"precision": precision, "local_steps": steps})
        collate = CountingCollate(self.pad_token_id)
        losses = []
        cpu, wall = time.process_time(), time.perf_counter()
        local_train(self.model, self.params, self.features, collate, config, config.lr, seed=seed,
                    on_step=lambda step, total, loss: losses.append(loss))
        return time.process_time() - cpu, time.perf_counter() - wall, collate.tokens, collate.positions, losses

    def flops(self, steps: int, seed: int = 1) -> int:
        from flexmoe.cost.flops import counted_flops

        return counted_flops(lambda: self.train("fp32", steps, seed))


def matmul_peak(dtype: torch.dtype, size: int = PEAK_SIZE, repeats: int = 5) -> tuple[float, float]:
    """Best (CPU-time, wall) FLOP/s of a size x size torch.matmul in `dtype`."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    torch.matmul(a, b)
    best_cpu = best_wall = 0.0
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        torch.matmul(a, b)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        flops = 2 * size**3
        best_cpu, best_wall = max(best_cpu, flops / max(cpu, 1e-9)), max(best_wall, flops / wall)
    return best_cpu, best_wall


def main(results_dir: pathlib.Path) -> None:
    run_with_threads(THREADS, _run, results_dir)


def _run(results_dir: pathlib.Path) -> None:
    load_start = os.getloadavg()[0]
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    lines = [header_markdown("Local training throughput and MFU (tiny base)", COMMAND),
             __doc__.split("\n\n", 1)[1].strip(), "",
             f"{STEPS} steps per timed round, {REPEATS} alternating repeats (medians), {THREADS} intra-op thread.", "",
             "## Matmul peak (measured in this run)", "", "| precision | GFLOP/s (CPU time) | GFLOP/s (wall) |",
             "|---|---:|---:|"]
    lines += [f"| {p} | {cpu / 1e9:.1f} | {wall / 1e9:.1f} |" for p, (cpu, wall) in peaks.items()]
    setups = {label: Setup(overrides) for label, overrides in METHODS}
    throughput = _throughput(setups, peaks)
    lines += ["", "## Throughput", "", *throughput["table"], "", *_targets(throughput), ""]
    lines += ["## bf16 loss curve vs fp32 (FLEx)", "", *_loss_curves(), ""]
    lines += [f"Load average (1 min) at start {load_start:.1f}, at end {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} cores: the machine was shared with other jobs, so the comparable figures are "
              "the CPU-time ones and the ratios measured within this run.", ""]
    _write(results_dir, "train", lines)


def _throughput(setups: dict, peaks: dict) -> dict:
    flops = {label: setup.flops(STEPS) for label, setup in setups.items()}
    for setup in setups.values():  # first-call allocations and kernel selection
        for precision in PRECISIONS:
            setup.train(precision, 1)
    runs: dict[tuple[str, str], list] = {}
    for _ in range(REPEATS):  # alternate, so that load from other processes hits every row alike
        for label, setup in setups.items():
            for precision in PRECISIONS:
                runs.setdefault((label, precision), []).append(setup.train(precision, STEPS)[:4])
    table = ["| method | precision | trainable params | tokens/s (CPU time) | tokens/s (wall) | GFLOP / token "
             "| MFU (CPU time) | MFU (wall) | padding |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    rates = {}
    for (label, precision), samples in runs.items():
        cpu = statistics.median(s[0] for s in samples)
        wall = statistics.median(s[1] for s in samples)
        tokens, positions = samples[0][2], samples[0][3]
        trainable = sum(p.numel() for p in setups[label].params.values())
        peak_cpu, peak_wall = peaks[precision]
        rates[(label, precision)] = (tokens / cpu, flops[label] / cpu / peak_cpu)
        table.append(f"| {label} | {precision} | {trainable:,} | {tokens / cpu:,.0f} | {tokens / wall:,.0f} | "
                     f"{flops[label] / tokens / 1e9:.4f} | {flops[label] / cpu / peak_cpu:.3f} | "
                     f"{flops[label] / wall / peak_wall:.3f} | {1 - tokens / positions:.0%} |")
    return {"table": table, "rates": rates}


def _targets(throughput: dict) -> list[str]:
    rates = throughput["rates"]
    lines = ["Targets (CPU-time figures):", ""]
    for label, _ in METHODS:
        fp32_rate, fp32_mfu = rates[(label, "fp32")]
        bf16_rate, _ = rates[(label, "bf16")]
        speedup = bf16_rate / fp32_rate
        lines.append(f"- {label}: fp32 MFU {fp32_mfu:.3f} (target >= 0.7: {'met' if fp32_mfu >= 0.7 else 'missed'}); "
                     f"bf16 / fp32 tokens/s {speedup:.2f}x (target >= 2x: {'met' if speedup >= 2 else 'missed'})")
    return lines


def _loss_curves() -> list[str]:
    flex = dict(METHODS)["flex"]
    curves = {}
    for seed in SEEDS:
        for precision in PRECISIONS:  # a fresh model per curve: same init, graft and batches per seed
            curves[(seed, precision)] = Setup(flex, seed=seed).train(precision, CURVE_STEPS, seed=seed)[4]
    tail = {key: statistics.mean(curve[-CURVE_WINDOW:]) for key, curve in curves.items()}
    fp32_tails = [tail[(seed, "fp32")] for seed in SEEDS]
    spread = statistics.stdev(fp32_tails)
    gaps = [abs(tail[(seed, "bf16")] - tail[(seed, "fp32")]) for seed in SEEDS]
    step_gap = statistics.mean(abs(a - b) for seed in SEEDS
                               for a, b in zip(curves[(seed, "bf16")], curves[(seed, "fp32")]))
    lines = [f"{CURVE_STEPS} steps, seeds {', '.join(map(str, SEEDS))}; mean loss of the last {CURVE_WINDOW} steps:",
             "", "| seed | fp32 | bf16 | abs gap |", "|---:|---:|---:|---:|"]
    lines += [f"| {seed} | {tail[(seed, 'fp32')]:.4f} | {tail[(seed, 'bf16')]:.4f} | {gap:.4f} |"
              for seed, gap in zip(SEEDS, gaps)]
    within = max(gaps) <= spread
    lines += ["", f"fp32 seed-to-seed std of that mean: {spread:.4f}; largest bf16-vs-fp32 gap: {max(gaps):.4f}; "
              f"mean per-step gap over all steps: {step_gap:.4f}. "
              f"Target (bf16 curve within noise of fp32): {'met' if within else 'missed'} "
              f"(largest gap {'<=' if within else '>'} the fp32 seed spread).", "",
              "Per-step losses (seed 0):", "", "| step | fp32 | bf16 |", "|---:|---:|---:|"]
    lines += [f"| {i + 1} | {a:.4f} | {b:.4f} |" for i, (a, b) in enumerate(zip(curves[(0, "fp32")],
                                                                               curves[(0, "bf16")]))]
    return lines


def _write(results_dir: pathlib.Path, name: str, lines: list[str]) -> None:
    write_result(results_dir, name, lines)

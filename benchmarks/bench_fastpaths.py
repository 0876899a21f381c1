"""Before and after each fast path, measured in one run.

Each variant is the package source of one commit (`git archive`; today's: this checkout's
`src/`), run in a child process (`python -m benchmarks.bench_fastpaths CHILD THREADS OVERRIDES`
with that source first on PYTHONPATH) that measures the same work on today's shipped tiny base:
FLEx's one-shot expert selection for client 0 of the default run (calibration batches as the
engine builds them), and `STEPS` local training steps of its grafted model in fp32 and in bf16
autocast (default train config otherwise; each commit partitions the data its own way). Children
alternate over `ROUNDS` rounds; each reports the median of `REPEATS` CPU-time measurements
(robust to the other jobs on the shared machine; with 2 threads, CPU seconds count both cores,
so the wall time is the figure that shows whether the second thread pays).
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

from benchmarks.machine import PREVIOUS_FLEX_RECIPE, header_markdown, write_result

ROOT = pathlib.Path(__file__).resolve().parent.parent
# every variant trains today's shipped base (a commit's own `tiny` is the base it shipped); today's
# code first with the fast-path commits' FLEx recipe (the default grafts under LoRA since), so that
# it does the same work, then with its default
COMMON = [f"model={ROOT / 'src' / 'flexmoe' / 'assets' / 'tiny'}"]
# (label, commit (None: this checkout), intra-op threads, overrides): each fast path's commit, the
# last one with two threads, and today's code
VARIANTS = (
    ("before: logits at every position (d3ef7ac)", "d3ef7ac", 1, []),
    ("+ LM head only where a response token is predicted (e38aa6f)", "e38aa6f", 1, []),
    ("+ selection pass through the decoder only (5f3c5d3)", "5f3c5d3", 1, []),
    ("+ fp32 attention under bf16 autocast (075b55d)", "075b55d", 1, []),
    ("075b55d with 2 threads", "075b55d", 2, []),
    ("today, the same recipe (a full trainable copy at the shared lr)", None, 1, list(PREVIOUS_FLEX_RECIPE)),
    ("today, the default recipe (a frozen copy under LoRA)", None, 1, []),
)
STEPS = 5
REPEATS = 3
ROUNDS = 2
COMMAND = "nice -n 5 .venv/bin/python -m benchmarks fastpaths"


def child(threads: int, overrides: list[str], steps: int = STEPS) -> dict:
    """Median [CPU, wall] seconds of client 0's expert selection and of a `steps`-step local round
    (fp32 and bf16), with the flexmoe first on sys.path (today's or a fast-path commit's layout)."""
    import torch

    from flexmoe.config import load_config
    from flexmoe.data import collate
    from flexmoe.models import select_experts
    from flexmoe.train import local_train

    try:
        from flexmoe.clients import make_client, partition_data
        from flexmoe.engine.model import load_model
        from flexmoe.methods.build import build_method
        from flexmoe.models import apply_roles

        def graft(method, model, calibration):
            method.select_and_graft(model, calibration, seed=0)
            return apply_roles(model, method.roles).trainable
    except ImportError:  # the fast-path commits' layout (2026-11-21)
        from flexmoe.engine.core import load_model, make_client, partition_data
        from flexmoe.methods import build_method

        def graft(method, model, calibration):
            method.personalize(model, calibration, seed=0)
            return {n: p for n, p in model.named_parameters() if p.requires_grad}

    torch.set_num_threads(threads)
    config = load_config(None, [*COMMON, *overrides, f"train.local_steps={steps}"])
    method = build_method(config)
    model, tokenizer = load_model(config, method)
    features = make_client(config, partition_data(config)[0], tokenizer).features
    batch = config.train.batch_size
    sample = features[: config.flex.calibration_examples]
    calibration = [collate(sample[i : i + batch], tokenizer.pad_token_id) for i in range(0, len(sample), batch)]

    def select():
        select_experts(model, calibration, k=1, max_tokens=config.flex.calibration_max_tokens, seed=0)

    params = graft(method, model, calibration)

    def train(precision: str):
        train_config = config.train.model_copy(update={"precision": precision})
        return lambda: local_train(model, params, features, lambda f: collate(f, tokenizer.pad_token_id),
                                   train_config, train_config.lr, seed=1)

    work = {"selection": select, "round fp32": train("fp32"), "round bf16": train("bf16")}
    for fn in work.values():  # warm-up
        fn()
    samples = {name: [] for name in work}
    for _ in range(REPEATS):
        for name, fn in work.items():
            cpu, wall = time.process_time(), time.perf_counter()
            fn()
            samples[name].append((time.process_time() - cpu, time.perf_counter() - wall))
    return {name: [statistics.median(s[0] for s in runs), statistics.median(s[1] for s in runs)]
            for name, runs in samples.items()}


def _source(commit: str | None, scratch: pathlib.Path) -> pathlib.Path:
    if commit is None:
        return ROOT / "src"
    target = scratch / commit
    if not target.exists():
        archive = subprocess.run(["git", "archive", commit, "src"], cwd=ROOT, capture_output=True, check=True).stdout
        target.mkdir()
        archive_path = scratch / f"{commit}.tar"
        archive_path.write_bytes(archive)
        with tarfile.open(archive_path) as tar:
            tar.extractall(target, filter="data")
    return target / "src"


def _measure(source: pathlib.Path, threads: int, overrides: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench_fastpaths", "CHILD", str(threads),
                             json.dumps(overrides)], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"fast-path child ({source}) failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(results_dir: pathlib.Path) -> None:
    load_start = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {label: [] for label, *_ in VARIANTS}
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(ROUNDS):  # alternate variants, so that load from other jobs hits each alike
            for label, commit, threads, overrides in VARIANTS:
                runs[label].append(_measure(_source(commit, pathlib.Path(scratch)), threads, overrides))
    lines = [header_markdown("Fast paths: before and after, one run", COMMAND), __doc__.split("\n\n", 1)[1].strip(),
             "", f"{STEPS} steps per local round (batch 8, max length 256); medians of {ROUNDS} children x "
             f"{REPEATS} repeats.", "",
             "| variant | selection CPU s | round fp32 CPU s | round bf16 CPU s | selection wall s | round fp32 wall s "
             "| round bf16 wall s |", "|---|---:|---:|---:|---:|---:|---:|"]
    medians = {}
    for label, samples in runs.items():
        medians[label] = {name: [statistics.median(s[name][i] for s in samples) for i in (0, 1)]
                          for name in samples[0]}
        m = medians[label]
        lines.append(f"| {label} | {m['selection'][0]:.3f} | {m['round fp32'][0]:.3f} | {m['round bf16'][0]:.3f} | "
                     f"{m['selection'][1]:.3f} | {m['round fp32'][1]:.3f} | {m['round bf16'][1]:.3f} |")
    before, after, today = (medians[VARIANTS[i][0]] for i in (0, 3, 5))
    lines += ["", "Speed-up, all fast paths (1 thread) over before, CPU time: "
              + ", ".join(f"{name} {before[name][0] / after[name][0]:.2f}x" for name in before) + ".",
              "Today's code (the same recipe) over the last fast path, CPU time: "
              + ", ".join(f"{name} {after[name][0] / today[name][0]:.2f}x" for name in after) + ".",
              "Two threads over one, wall time (075b55d): "
              + ", ".join(f"{name} {after[name][1] / medians[VARIANTS[4][0]][name][1]:.2f}x" for name in after) + ".",
              "", f"Load average (1 min) at start {load_start:.1f}, at end {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} cores (shared machine).", ""]
    write_result(results_dir, "fastpaths", lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["CHILD"]:
        print(json.dumps(child(int(sys.argv[2]), json.loads(sys.argv[3]))))

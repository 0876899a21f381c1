"""Speed of the evaluation, the training step and whole runs: today's code against a base commit.

Each variant is the package source of one commit (`git archive`; "now" is this checkout's
`src/`), run in a child process with that source first on PYTHONPATH, one intra-op thread,
alternating over `ROUNDS` rounds so that load from other jobs hits both alike. Times are CPU
seconds of the child (one thread: core-seconds, robust to the other processes of a shared
machine; the wall seconds are reported beside them). Each child measures, on today's shipped
tiny base (for both variants: a commit's own `tiny` is the base it shipped) and the default run
config:

- greedy: `generate_responses` on client 0's final evaluation sample (128 examples, 32 new
  tokens, `eval.batch_size`), the answers compared between the variants;
- knowledge: `knowledge_measures` at the final sizes (512 held-out documents, 1,500 probes,
  routing; the study's 256 and 300 with FLEXMOE_BENCH_QUICK=1), the measures compared between
  the variants;
- train step: `local_train` of FedAvg with LoRA on attention (the default train config: batch
  8, max length 256, bf16 autocast) on client 0, against Hugging Face's `Trainer` training the
  same PEFT model on the same features, batch and precision (its default loss: every position
  through the LM head);
- runs: `flexmoe run` end to end (the child's CPU seconds, model loading and partitioning
  included) of the default run and of the study-sized run (64 test examples per client, 300
  probes, 256 documents), their summary metrics compared between the variants (today's code
  with the base commit's FLEx recipe, `PREVIOUS_FLEX_RECIPE`, so that both make the same run); with
  FLEXMOE_BENCH_QUICK=1 only a one-round, 3-step study-sized run (the full runs take tens of
  minutes each on a loaded 2-core machine), no knowledge child, and the training step of
  today's code only.
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

from benchmarks.machine import PREVIOUS_FLEX_RECIPE, header_markdown, positive_int_env, write_result

ROOT = pathlib.Path(__file__).resolve().parent.parent
BASE = "23c0b9a"  # the code before the speed work (issue 25)
# FLEXMOE_BENCH_QUICK=1: one child per variant, the knowledge pass and the run at the study's
# evaluation sizes, and a one-round run of 3 steps (what fits a loaded shared machine)
QUICK = os.environ.get("FLEXMOE_BENCH_QUICK") == "1"
# FLEXMOE_BENCH_ROUNDS=N: N alternating children per variant (a full round of both variants takes
# about 45 minutes on an idle 2-core machine)
DEFAULT_ROUNDS = 1 if QUICK else 2
ROUNDS = positive_int_env("FLEXMOE_BENCH_ROUNDS", DEFAULT_ROUNDS)
STEPS = 5  # local training steps per timed train measurement
COMMAND = (("FLEXMOE_BENCH_QUICK=1 " if QUICK else "")
           + (f"FLEXMOE_BENCH_ROUNDS={ROUNDS} " if ROUNDS != DEFAULT_ROUNDS else "")
           + "nice -n 5 .venv/bin/python -m benchmarks speed")
# both variants run today's shipped base (a variant's own `tiny` would be the base of its commit)
COMMON = ["runtime.threads=1", f"model={ROOT / 'src' / 'flexmoe' / 'assets' / 'tiny'}"]
# the children of each variant; the quick mode leaves out the knowledge pass (unchanged since the
# base) and measures the training step of today's code only
WORK = ("greedy",) if QUICK else ("greedy", "knowledge", "train")
STUDY_SIZES = ["eval.max_test_examples=64", "eval.max_probes=300", "eval.knowledge_max_docs=256"]
KNOWLEDGE = STUDY_SIZES if QUICK else []  # the knowledge child's sizes (default: the final ones)
# (label, overrides): the default run and the study-sized run (64 examples, 300 probes, 256 documents)
RUNS = ((("small run: 2 clients, 1 round of 2 steps, 64 examples, 100 probes, 64 documents",
          ["rounds=1", "num_clients=2", "clients_per_round=2", "train.local_steps=2", "eval.max_test_examples=64",
           "eval.max_probes=100", "eval.knowledge_max_docs=64"]),) if QUICK else (
    ("default run", []),
    ("study-sized run", STUDY_SIZES),
))
SUMMARY_KEYS = ("rouge_l_avg", "knowledge_loss", "probe_accuracy", "global_knowledge_loss")


def _cpu_wall(fn):
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn()
    return result, time.process_time() - cpu, time.perf_counter() - wall


def child(work: str) -> dict:
    """One measurement in this process (the flexmoe on sys.path is the variant's)."""
    import torch

    torch.set_num_threads(1)
    from flexmoe.config import load_config

    try:
        from flexmoe.clients import make_client, partition_data
        from flexmoe.engine.model import load_model
        from flexmoe.methods.build import build_method
    except ImportError:  # the base commit's layout, before engine/ was split by side and methods became packages
        from flexmoe.data.clients import make_client, partition_data
        from flexmoe.engine.core import load_model
        from flexmoe.methods import build_method

    if work == "greedy" or work == "knowledge":
        config = load_config(None, COMMON + (KNOWLEDGE if work == "knowledge" else []))
        model, tokenizer = load_model(config, build_method(config))
        if work == "greedy":
            from flexmoe.eval.detail import eval_sample
            from flexmoe.eval.rouge import generate_responses

            examples = eval_sample(config, 0, partition_data(config)[0].test, config.rounds)
            answers, cpu, wall = _cpu_wall(lambda: generate_responses(
                model, tokenizer, examples, template=config.data.template, max_new_tokens=config.eval.max_new_tokens,
                batch_size=config.eval.batch_size, max_prompt_length=config.train.max_length))
            return {"cpu": cpu, "wall": wall, "examples": len(examples), "answers": answers}
        from flexmoe.eval.measures import knowledge_measures

        out, cpu, wall = _cpu_wall(lambda: knowledge_measures(model, tokenizer, config.eval))
        return {"cpu": cpu, "wall": wall, "measures": {k: v for k, v in out.items() if k != "expert_load"}}
    # the training step: ours and transformers' Trainer on the same PEFT model, batch and precision
    config = load_config(None, COMMON + ["method=fedavg", "lora.scope=attention", f"train.local_steps={STEPS}"])
    method = build_method(config)
    model, tokenizer = load_model(config, method)
    from flexmoe.data import collate
    from flexmoe.models.roles import split_parameters
    from flexmoe.train import local_train

    features = make_client(config, partition_data(config)[0], tokenizer).features
    params = split_parameters(model, method.roles).trainable

    def ours():
        return local_train(model, params, features, lambda f: collate(f, tokenizer.pad_token_id), config.train,
                           config.train.lr, seed=1)

    def trainer():
        from transformers import Trainer, TrainingArguments

        with tempfile.TemporaryDirectory() as scratch:
            args = TrainingArguments(
                output_dir=scratch, per_device_train_batch_size=config.train.batch_size, max_steps=STEPS,
                learning_rate=config.train.lr, lr_scheduler_type="constant", warmup_steps=0,
                weight_decay=config.train.weight_decay, max_grad_norm=config.train.max_grad_norm,
                bf16=config.train.precision == "bf16", use_cpu=True, report_to=[], save_strategy="no",
                logging_strategy="no", dataloader_num_workers=0, disable_tqdm=True, seed=1,
                remove_unused_columns=False,
            )
            Trainer(model=model, args=args, train_dataset=features,
                    data_collator=lambda f: collate(f, tokenizer.pad_token_id)).train()
        model.eval()

    out = {}
    for name, fn in (("ours", ours), ("trainer", trainer)):
        fn()  # warm-up: first-call allocations, kernel selection
        _, cpu, wall = _cpu_wall(fn)
        out[name] = {"cpu": cpu / STEPS, "wall": wall / STEPS}
    return out


def _source(commit: str | None, scratch: pathlib.Path) -> pathlib.Path:
    if commit is None:
        return ROOT / "src"
    target = scratch / commit
    if not target.exists():
        archive = subprocess.run(["git", "archive", commit, "src"], cwd=ROOT, capture_output=True, check=True).stdout
        target.mkdir()
        (scratch / f"{commit}.tar").write_bytes(archive)
        with tarfile.open(scratch / f"{commit}.tar") as tar:
            tar.extractall(target, filter="data")
    return target / "src"


def _env(source: pathlib.Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": "1"}


def _measure(source: pathlib.Path, work: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench_speed", "CHILD", work], cwd=ROOT,
                            env=_env(source), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"speed child {work} ({source}) failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _run(source: pathlib.Path, overrides: list[str], out_dir: pathlib.Path) -> dict:
    """`flexmoe run` in a child: its CPU seconds (children's rusage), wall seconds and summary."""
    sets = [arg for o in COMMON + overrides for arg in ("--set", o)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "flexmoe.cli", "run", "--quiet", *sets, "--output-dir",
                             str(out_dir)], cwd=ROOT, env=_env(source), capture_output=True, text=True, check=False)
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise RuntimeError(f"flexmoe run ({source}) failed:\n{result.stderr[-3000:]}")
    summary = json.loads((out_dir / "summary.json").read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"cpu": cpu, "wall": wall, "summary": {k: summary.get(k) for k in SUMMARY_KEYS}}


def main(results_dir: pathlib.Path) -> None:
    load_start = os.getloadavg()[0]
    variants = {f"base ({BASE})": BASE, "now": None}
    samples: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = pathlib.Path(scratch)
        for round_index in range(ROUNDS):
            for label, commit in variants.items():
                source = _source(commit, scratch)
                for work in WORK:
                    samples.setdefault((label, work), []).append(_measure(source, work))
                if QUICK and commit is None:  # the training step against Trainer: today's code only
                    samples.setdefault((label, "train"), []).append(_measure(source, "train"))
                for run_index, (run_label, overrides) in enumerate(RUNS):
                    out_dir = scratch / f"run-{commit}-{round_index}-{run_index}"
                    # today's code with the base commit's recipe (the default grafts under LoRA since): the same run
                    recipe = list(PREVIOUS_FLEX_RECIPE) if commit is None else []
                    samples.setdefault((label, run_label), []).append(_run(source, overrides + recipe, out_dir))
    lines = [header_markdown("Speed: evaluation, training step and runs against the base commit", COMMAND),
             __doc__.split("\n\n", 1)[1].strip(), "", f"Medians of {ROUNDS} alternating children per variant.", ""]
    lines += _tables(samples, list(variants))
    lines += ["", f"Load average (1 min) at start {load_start:.1f}, at end {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} cores (shared machine: compare the CPU-time ratios).", ""]
    write_result(results_dir, "speed", lines)


def _median(runs: list[dict], *keys) -> float:
    def pick(run):
        for key in keys:
            run = run[key]
        return run

    return statistics.median(pick(run) for run in runs)


def _tables(samples: dict, labels: list[str]) -> list[str]:
    base, now = labels
    lines = ["| measure | base CPU s | now CPU s | speed-up (CPU) | base wall s | now wall s | same result |",
             "|---|---:|---:|---:|---:|---:|---|"]
    greedy_b, greedy_n = samples[(base, "greedy")], samples[(now, "greedy")]
    examples = greedy_n[0]["examples"]
    rows = [("greedy evaluation, %d examples" % examples, greedy_b, greedy_n, ("cpu",), ("wall",),
             greedy_b[0]["answers"] == greedy_n[0]["answers"])]
    if (now, "knowledge") in samples:  # the quick mode leaves the knowledge pass out
        rows.append(("knowledge measures, final sizes", samples[(base, "knowledge")], samples[(now, "knowledge")],
                     ("cpu",), ("wall",),
                     samples[(base, "knowledge")][0]["measures"] == samples[(now, "knowledge")][0]["measures"]))
    for run_label, _ in RUNS:
        b, n = samples[(base, run_label)], samples[(now, run_label)]
        rows.append((run_label, b, n, ("cpu",), ("wall",), b[0]["summary"] == n[0]["summary"]))
    for label, b, n, cpu, wall, same in rows:
        cb, cn = _median(b, *cpu), _median(n, *cpu)
        lines.append(f"| {label} | {cb:.2f} | {cn:.2f} | {cb / cn:.2f}x | {_median(b, *wall):.2f} | "
                     f"{_median(n, *wall):.2f} | {'yes' if same else 'NO'} |")
    rate_b, rate_n = examples / _median(greedy_b, "cpu"), examples / _median(greedy_n, "cpu")
    lines += ["", f"Greedy evaluation: {rate_b:.1f} -> {rate_n:.1f} examples per CPU second "
              f"({rate_n / rate_b:.2f}x), answers {'identical' if rows[0][5] else 'DIFFERENT'}."]
    for label in labels:
        if (label, "knowledge") in samples:
            lines.append(f"Knowledge measures ({label}): {json.dumps(samples[(label, 'knowledge')][0]['measures'])}")
    for run_label, _ in RUNS:
        for label in labels:
            lines.append(f"Summary of {run_label} ({label}): {json.dumps(samples[(label, run_label)][0]['summary'])}")
    lines += ["", "## Local training step vs Hugging Face Trainer + PEFT", "",
              "| variant | ours CPU s/step | Trainer CPU s/step | Trainer / ours |", "|---|---:|---:|---:|"]
    for label in (label for label in labels if (label, "train") in samples):
        t = samples[(label, "train")]
        ours, theirs = _median(t, "ours", "cpu"), _median(t, "trainer", "cpu")
        lines.append(f"| {label} | {ours:.3f} | {theirs:.3f} | {theirs / ours:.2f}x |")
    return lines


if __name__ == "__main__":
    if sys.argv[1:2] == ["CHILD"]:
        print(json.dumps(child(sys.argv[2])))

"""Robust server rules against one attacking client, and the accuracy cost of compressed messages.

The default run (FLEx on the shipped base and data, 4 clients, seed 0; scaled down, below) under each server
rule: FedAvg (`server.robust = none`), coordinate-wise median, trimmed mean (beta 0.25: one reply cut
at each end of 4) and multi-Krum (f = 1, averaging the 3 best) — clean, and with client 0 attacking
through the in-process attack harness (`[faults]`): `scale:10` (10 x its update) and `sign-flip`
(-update). Each attacked run is paired with the clean run of the same rule, example by example:
the honest clients' personalised models (clients 1-3: the attacker's own model is not at stake)
and the global model on every client's test sample (ROUGE-L), and the held-out documents' mean
token loss (knowledge). Then the messages in bf16, fp16, int8 and int8 with error feedback, each
paired with the fp32 run (the clean FedAvg run) on all four clients; bytes are those the runs
counted on the wire. Intervals: stratified bootstrap 95% CI over clients x examples
(`flexmoe.analysis.paired`). "holds" = the CI covers 0 or the attacked run is better; "harmed" = the CI
lies wholly on the worse side; for the wire rows "inconclusive" where the CI covers 0.

Runs `flexmoe run`s on one thread each, FLEXMOE_BENCH_JOBS of them at a time (default 1; start it
under `nice`, each run inherits it); the training budget and evaluation sizes are reduced uniformly (below) to fit a shared 2-core machine. FLEXMOE_BENCH_RUNS names the folder of the run
directories (default /tmp/flexmoe-bench-attacks); finished runs are reused, so an interrupted
benchmark continues; FLEXMOE_BENCH_REPORT_ONLY=1 writes the result from the runs that exist.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import time

from benchmarks.machine import bench_jobs, header_markdown, run_each, write_result

# the default run scaled down uniformly to fit a shared 2-core machine (said in the result file)
BUDGET = ("rounds=3", "train.local_steps=10", "data.max_train_per_client=400")
EVAL = ("eval.max_test_examples=32", "eval.max_probes=100", "eval.knowledge_max_docs=128", "eval.every=0",
        "eval.base=false", "eval.content_free=false", "runtime.threads=1", "seed=0")
ATTACKER = 0
RULES = (("FedAvg", ["server.robust=none"]), ("median", ["server.robust=median"]),
         ("trimmed mean", ["server.robust=trimmed-mean", "server.trim_beta=0.25"]),
         ("multi-Krum", ["server.robust=krum", "server.krum_f=1"]))
ATTACKS = (("scale x10", ["faults.attack=scale:10"]), ("sign-flip", ["faults.attack=sign-flip"]))
WIRES = (("bf16", ["wire.dtype=bf16"]), ("fp16", ["wire.dtype=fp16"]), ("int8", ["wire.quantize=int8"]),
         ("int8 + error feedback", ["wire.quantize=int8", "wire.error_feedback=true"]))


def slug(*labels: str) -> str:
    return "-".join(label.lower().replace(" + ", "-").replace(" ", "-") for label in labels)


def planned_runs() -> list[tuple[str, list[str]]]:
    """(run name, overrides), in the order they run: each rule's clean and scale runs first, then
    the sign-flip and wire runs interleaved (an interrupted benchmark has some of each)."""
    attack = [f"faults.malicious_clients=[{ATTACKER}]"]
    runs = []
    for rule, overrides in RULES:
        runs.append((slug(rule, "clean"), overrides))
        runs.append((slug(rule, ATTACKS[0][0]), [*overrides, *attack, *ATTACKS[0][1]]))
    flips = [(slug(rule, ATTACKS[1][0]), [*overrides, *attack, *ATTACKS[1][1]]) for rule, overrides in RULES]
    wires = [(slug("wire", wire), overrides) for wire, overrides in (WIRES[2], WIRES[0], WIRES[3], WIRES[1])]
    return runs + [run for pair in zip(wires, flips) for run in pair]


def run_all(root: pathlib.Path) -> dict[str, float]:
    """Every planned run that has no summary yet (FLEXMOE_BENCH_JOBS at a time) -> {name: seconds} of those run now."""
    pending = [(name, overrides) for name, overrides in planned_runs()
               if not (root / name / "summary.json").is_file()]

    def run(item) -> tuple[str, float]:
        name, overrides = item
        run_dir = root / name
        started = time.monotonic()
        command = [sys.executable, "-m", "flexmoe.cli", "run", "--output-dir", str(run_dir), "--quiet"]
        for setting in (*BUDGET, *EVAL, *overrides):
            command += ["--set", setting]
        print(f"== {name}: {' '.join(overrides) or 'defaults'}", flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run starts again
        with (root / f"{name}.log").open("w") as log:
            subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log,
                           stderr=subprocess.STDOUT)
        return name, time.monotonic() - started

    return dict(run_each(pending, run, bench_jobs()))


# ---- paired statistics -----------------------------------------------------------------------
def paired(run: pathlib.Path, clean: pathlib.Path, model: str, clients: set[int] | None):
    """ROUGE-L of `model` ("personal" or "global") in `run` minus `clean`, paired per example."""
    from flexmoe.analysis.paired import answer_scores, difference, last_round

    def scores(path):
        found = answer_scores(path, last_round(path), model)
        return {c: s for c, s in found.items() if clients is None or c in clients}

    return difference([(0, scores(run), scores(clean))])


def paired_docs(run: pathlib.Path, clean: pathlib.Path, model: str, clients: set[int] | None):
    """Held-out documents' mean token loss of `model` in `run` minus `clean`, paired per document."""
    from flexmoe.analysis.paired import knowledge_items, last_round, paired_knowledge, personal_knowledge

    if model == "global":
        matched = [((0, -1), knowledge_items(run, last_round(run), "global"),
                    knowledge_items(clean, last_round(clean), "global"))]
    else:
        mine, theirs = personal_knowledge(run), personal_knowledge(clean)
        matched = [((0, c), mine[c], theirs[c]) for c in sorted(set(mine) & set(theirs))
                   if clients is None or c in clients]
    return paired_knowledge([m for m in matched if m[2] is not None])[1]


def cell(result, worse: int) -> str:
    """'+0.0123 [-0.01, +0.03] holds' (worse = -1: lower is worse, ROUGE-L; +1: higher, loss)."""
    if result is None:
        return "n/a"
    harmed = result.ci_high < 0 if worse < 0 else result.ci_low > 0
    better = result.ci_low > 0 if worse < 0 else result.ci_high < 0
    word = "**harmed**" if harmed else ("better" if better else "holds")
    return f"{result.diff:+.4f} [{result.ci_low:+.4f}, {result.ci_high:+.4f}] {word}"


def wire_cell(result, worse: int) -> str:
    if result is None:
        return "n/a"
    covers = result.ci_low <= 0 <= result.ci_high
    word = "inconclusive" if covers else ("worse" if (result.diff < 0) == (worse < 0) else "better")
    return f"{result.diff:+.4f} [{result.ci_low:+.4f}, {result.ci_high:+.4f}] {word}"


def summary(path: pathlib.Path) -> dict:
    import json

    return json.loads((path / "summary.json").read_text())


def attack_lines(root: pathlib.Path) -> list[str]:
    honest = {1, 2, 3}
    header = ["rule", "attack", "ROUGE-L − clean, personalised (honest clients)", "ROUGE-L − clean, global model",
              "doc loss − clean, personalised (honest)", "doc loss − clean, global"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * 4]
    means = ["", "Means of each run (every client):", "",
             "| rule | run | personalised ROUGE-L | global ROUGE-L | held-out loss, personalised | "
             "held-out loss, global | probe accuracy, personalised |", "|---|---|---:|---:|---:|---:|---:|"]
    for rule, _ in RULES:
        clean = root / slug(rule, "clean")
        if not (clean / "summary.json").is_file():
            continue
        for name in ("clean", *(a for a, _ in ATTACKS)):
            run = root / slug(rule, name)
            if not (run / "summary.json").is_file():
                means.append(f"| {rule} | {name} | not run | | | | |")
                continue
            means.append(mean_row(rule, name, summary(run)))
            if name == "clean":
                continue
            lines.append(f"| {rule} | {name} | {cell(paired(run, clean, 'personal', honest), -1)} | "
                         f"{cell(paired(run, clean, 'global', None), -1)} | "
                         f"{cell(paired_docs(run, clean, 'personal', honest), +1)} | "
                         f"{cell(paired_docs(run, clean, 'global', None), +1)} |")
    return lines + means


def mean_row(rule: str, name: str, s: dict) -> str:
    values = [s.get(k) for k in ("rouge_l_avg", "global_rouge_l_avg", "knowledge_loss", "global_knowledge_loss",
                                 "probe_accuracy")]
    return f"| {rule} | {name} | " + " | ".join("n/a" if v is None else f"{v:.4f}" for v in values) + " |"


def wire_lines(root: pathlib.Path) -> list[str]:
    reference = root / slug(RULES[0][0], "clean")
    if not (reference / "summary.json").is_file():
        return ["(the fp32 run did not finish)"]
    base = summary(reference)
    lines = ["| wire | bytes up (total) | bytes down (total) | up / fp32 | ROUGE-L − fp32, personalised | "
             "ROUGE-L − fp32, global | doc loss − fp32, personalised |", "|---|---:|---:|---:|---:|---:|---:|",
             f"| fp32 | {base['bytes_up']:,} | {base['bytes_down']:,} | 1 | — | — | — |"]
    for wire, _ in WIRES:
        run = root / slug("wire", wire)
        if not (run / "summary.json").is_file():
            lines.append(f"| {wire} | not run | | | | | |")
            continue
        s = summary(run)
        lines.append(f"| {wire} | {s['bytes_up']:,} | {s['bytes_down']:,} | {s['bytes_up'] / base['bytes_up']:.3f} | "
                     f"{wire_cell(paired(run, reference, 'personal', None), -1)} | "
                     f"{wire_cell(paired(run, reference, 'global', None), -1)} | "
                     f"{wire_cell(paired_docs(run, reference, 'personal', None), +1)} |")
    return lines


def main(results_dir: pathlib.Path) -> None:
    root = pathlib.Path(os.environ.get("FLEXMOE_BENCH_RUNS", "/tmp/flexmoe-bench-attacks"))
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    seconds = {} if os.environ.get("FLEXMOE_BENCH_REPORT_ONLY") == "1" else run_all(root)
    intro, rest = __doc__.split("\n\n", 1)
    lines = [header_markdown("Robust rules under attack; compressed messages", "python -m benchmarks attacks"),
             rest.strip(), "",
             f"Scaled down from the default run, the same for every run (the machine's 2 cores were shared "
             f"with other jobs): {', '.join(BUDGET)}; evaluation {', '.join(EVAL)} (test examples per client, "
             "probes, held-out documents; no learning curve, no base or content-free rows: every comparison "
             "is between two runs). One seed (0): the CIs are over clients x examples of that seed.", "",
             "## Attacks: each attacked run minus the clean run of the same rule", "",
             *attack_lines(root), "", "## Compressed messages: each run minus the fp32 run (clean FedAvg)", "",
             *wire_lines(root), ""]
    if seconds:
        lines.append(f"Runs made now: {len(seconds)}, {sum(seconds.values()) / 60:.0f} min in all "
                     f"({', '.join(f'{k} {v / 60:.1f}' for k, v in seconds.items())} min), on a machine shared with "
                     f"other jobs; finished in {(time.monotonic() - started) / 60:.0f} min.")
    write_result(results_dir, "attacks", lines)

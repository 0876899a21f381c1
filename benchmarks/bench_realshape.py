"""Real widths at cut depth: every shipped shape, random-init, end to end on the CPU, against its plan.

Each shape of `flexmoe plan --list` is built at `LAYERS[shape]` decoder layers with the shipped
tiny tokenizer's vocabulary, randomly initialised (seed 0) and saved in bf16
(`flexmoe.shapes.random_checkpoint`): real hidden sizes, expert widths, expert counts and
attention (DeepSeek-V2's MLA and its shared experts and dense first layer, Mixtral's 14336-wide
experts, Qwen3's 128 experts). On it, each command runs in its own fresh process, exactly as a
user types it: `flexmoe run` (FLEx, 2 clients, 1 round, base in bf16), `flexmoe graft`,
`flexmoe generate` and `flexmoe export` of client 0. Peak RSS is the child's `ru_maxrss`
(`os.wait4`); the plan is `flexmoe plan`'s `peak_bytes` for the run's config (the Python runtime,
the load, and one client step), and the target is |measured / planned - 1| <= 20%.

Grafting selection: a child loads the base and runs `select_experts` on calibration batches
of the run's shape (random token ids); per MoE layer, wall seconds and the peak of the tensor
bytes the selection creates (`TensorMemory`: captured inputs and routed outputs, and the chunked
expert outputs), at the shapes' 8, 60, 64 and 128 experts. The chunking keeps a chunk's
activations under a fixed number of elements (`flexmoe.models.selection`), so the peak should not
grow with the expert count; the time should grow about linearly with it (and the widths).

`python -m benchmarks realshape [SHAPE ...]` (`make bench realshape`); the machine is shared, so
the times are indicative only; memory does not depend on load.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks.machine import header_markdown, write_result

LAYERS = {"deepseek-v2-lite": 2, "mixtral-8x7b": 1, "olmoe-1b-7b": 2, "qwen1.5-moe-a2.7b": 2, "qwen3-30b-a3b": 2}
BATCH, LENGTH = 2, 128
TARGET = 0.20
RUN = [
    "method=flex", "num_clients=2", "clients_per_round=2", "rounds=1", "runtime.base_dtype=bf16",
    "runtime.threads=1", f"train.batch_size={BATCH}", f"train.max_length={LENGTH}", "train.local_steps=1",
    "data.max_train_per_client=8", "flex.calibration_examples=4", "eval.max_test_examples=1",
    "eval.max_new_tokens=4", "eval.knowledge_max_docs=2", "eval.max_probes=2",
]
COMMAND = "make bench realshape"
ROOT = pathlib.Path(__file__).resolve().parent.parent


def flexmoe(*args: str) -> list[str]:
    return [sys.executable, "-m", "flexmoe.cli", *args]


def measured(argv: list[str]) -> dict:
    """Run `argv` in a fresh child; its wall seconds and peak RSS (its own `ru_maxrss`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    start = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        child = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        output = log.read().decode(errors="replace")
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[2:])} failed ({child.returncode}):\n{output[-3000:]}")
    return {"seconds": time.perf_counter() - start, "peak_rss": usage.ru_maxrss * 1024, "output": output}


def shape_rows(name: str, work: pathlib.Path) -> dict:
    """Build `name` at cut depth in `work`, plan it, run every command on it, time its selection."""
    from flexmoe.config import load_config
    from flexmoe.cost.plan import plan
    from flexmoe.shapes import random_checkpoint

    model = work / "model"
    random_checkpoint(name, model, layers=LAYERS[name])
    planned = plan(load_config(None, [*RUN, f"model={model}"]), batch=BATCH, length=LENGTH, device_type="cpu")
    run_dir = work / "run"
    sets = [arg for item in [*RUN, f"model={model}"] for arg in ("--set", item)]
    commands = {
        "run": flexmoe("run", *sets, "--output-dir", str(run_dir)),
        "graft": flexmoe("graft", "--model", str(model), "--max-examples", "4", "--max-length", str(LENGTH),
                         "--batch-size", str(BATCH), "--dtype", "bfloat16", "--device", "cpu", "--json"),
        "generate": flexmoe("generate", "--run", str(run_dir), "--client", "0", "--prompt", "Name a colour.",
                            "--max-new-tokens", "8"),
        "export": flexmoe("export", "--run", str(run_dir), "--client", "0", "--out", str(work / "export")),
        "select": [sys.executable, "-m", "benchmarks.bench_realshape", "select", str(model)],
    }
    results = {label: measured(argv) for label, argv in commands.items()}
    summary = json.loads((run_dir / "summary.json").read_text())
    selection = json.loads(results["select"]["output"].strip().splitlines()[-1])
    return {"shape": name, "layers": LAYERS[name], "plan": planned.to_json(), "commands": results,
            "personal_bytes": summary.get("personal_bytes_per_client"), "selection": selection}


def select_child(model_dir: str) -> dict:
    """In this process: load the base (bf16) and time `select_experts` on random calibration batches."""
    import torch

    from flexmoe.models import load_base, moe_layers, select_experts
    from flexmoe.cost.memory import TensorMemory

    torch.set_num_threads(1)
    model, _ = load_base(model_dir, dtype=torch.bfloat16, device="cpu")
    layers = moe_layers(model)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, model.config.vocab_size, (BATCH, LENGTH), generator=generator) for _ in range(2)]
    with TensorMemory() as counter:
        start = time.perf_counter()
        select_experts(model, batches, k=1)
        seconds = time.perf_counter() - start
    return {"experts": layers[0].num_experts, "moe_layers": len(layers), "tokens": 2 * BATCH * LENGTH,
            "seconds_per_layer": seconds / len(layers), "peak_tensor_bytes": counter.peak}


def main(results_dir: pathlib.Path, names: list[str] | None = None) -> None:
    """Every shape, or `names` (also from $FLEXMOE_REALSHAPE, comma-separated)."""
    names = names or [n for n in os.environ.get("FLEXMOE_REALSHAPE", "").split(",") if n] or sorted(LAYERS)
    rows = []
    for name in names:
        print(f"   realshape: {name} at {LAYERS[name]} layer(s)", flush=True)
        work = pathlib.Path(tempfile.mkdtemp(prefix=f"realshape-{name}-"))
        try:
            rows.append(shape_rows(name, work))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        write_result(results_dir, "realshape", report(rows), echo=name == names[-1])  # each shape as it finishes


def report(rows: list[dict]) -> list[str]:
    gib = 2**30
    lines = [header_markdown("Real widths at cut depth: every shipped shape end to end on the CPU", COMMAND),
             __doc__.split("\n\n", 1)[1].strip(), "", f"Run config: `{' '.join(RUN)}`.", "",
             "| shape | layers | parameters | planned peak (GiB) | run peak RSS (GiB) | measured / planned | "
             "graft / generate / export peak RSS (GiB) | run s | personal bytes per client (plan / run) |",
             "|---|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in rows:
        p, c = r["plan"], r["commands"]
        ratio = c["run"]["peak_rss"] / p["peak_bytes"]
        verdict = "met" if abs(ratio - 1) <= TARGET else "missed"
        others = " / ".join(f"{c[k]['peak_rss'] / gib:.2f}" for k in ("graft", "generate", "export"))
        lines.append(
            f"| {r['shape']} | {r['layers']} | {p['total_params'] / 1e9:.2f} B | {p['peak_bytes'] / gib:.2f} | "
            f"{c['run']['peak_rss'] / gib:.2f} | {ratio:.2f} ({verdict}) | "
            f"{others} | "
            f"{c['run']['seconds']:.0f} | {p['personal_state_bytes']:,} / {r['personal_bytes']:,} |")
    lines += ["", "Plan parts (GiB): runtime = the Python process before any model; load = weights + the largest "
              "tensor in conversion; step = one client step's peak (weights, optimiser state, forward+backward).", "",
              "| shape | runtime | load | step | frozen weights (bf16) |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        p = r["plan"]
        lines.append(f"| {r['shape']} | {p['runtime_bytes'] / gib:.2f} | {p['load_peak'] / gib:.2f} | "
                     f"{p['memory']['peak'] / gib:.2f} | {p['memory']['weights_frozen'] / gib:.2f} |")
    lines += ["", "Grafting selection (`select_experts`, k = 1, random calibration tokens, one thread):", "",
              "| shape | experts | MoE layers | tokens | seconds per layer | peak tensor bytes of the selection (MiB) |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: r["selection"]["experts"]):
        s = r["selection"]
        lines.append(f"| {r['shape']} | {s['experts']} | {s['moe_layers']} | {s['tokens']} | "
                     f"{s['seconds_per_layer']:.2f} | {s['peak_tensor_bytes'] / 2**20:,.1f} |")
    lines += ["", f"Load average when done: {os.getloadavg()[0]:.1f} (shared machine: times are indicative).", ""]
    return lines


if __name__ == "__main__":
    if sys.argv[1:2] == ["select"]:
        print(json.dumps(select_child(sys.argv[2])))
    else:
        main(pathlib.Path(__file__).resolve().parent / "results", sys.argv[1:])

"""Real widths at cut depth: every shipped shape, random-init, end to end on the CPU, against its plan.

Each shape of `flexmoe plan --list` is built at `LAYERS[shape]` decoder layers with the shipped
tiny tokenizer's vocabulary, randomly initialised (seed 0) and saved in bf16
(`flexmoe.shapes.random_checkpoint`): real hidden sizes, expert widths, expert counts and
attention (DeepSeek-V2's MLA and its shared experts and dense first layer, Mixtral's 14336-wide
experts, Qwen3's 128 experts). On it, each command runs in its own fresh process, exactly as a
user types it: `flexmoe run` (FLEx, 2 clients, 1 round, base in bf16), `flexmoe graft`,
`flexmoe generate` and `flexmoe export` of client 0, and a run with `flex.graft_train=lora`.
Peak RSS is the child's own VmHWM (`PEAK_WRAPPER`; not `ru_maxrss`, which counts the forking
parent's RSS too); the plan is `flexmoe plan`'s `peak_bytes` for the run's config (the Python
runtime, the load, and one client step), and the target is |measured / planned - 1| <= 20%.

Grafting selection: a child loads the base and runs `select_experts` on calibration batches
of the run's shape (random token ids); per MoE layer, wall seconds and the peak of the tensor
bytes the selection creates (`TensorMemory`). `benchmarks/bench_selection.py` sweeps the expert
count itself (8, 60, 64, 128).

`FLEXMOE_REALSHAPE=shape,... python -m benchmarks realshape` (`make bench realshape`: all shapes;
`FLEXMOE_REALSHAPE_QUICK=1`: the FLEx run only); each shape's row is kept in
`realshape-<date>.json`, so shapes run one per invocation add up to one report. The machine is
shared, so the times are indicative only; memory does not depend on load.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks.machine import header_markdown, write_result
from flexmoe.files import write_text_atomic

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


# Runs a module as `python -m` does and, at exit, writes its own peak RSS: VmHWM, the high-water mark
# of the address space exec gave it. Not `ru_maxrss`: Linux folds into it the RSS of the address space
# the child was forked (or vforked) from, so every child reported this process's own peak (3.84 GiB
# for each of the six Qwen1.5 commands: this process had just built the checkpoint).
PEAK_WRAPPER = """import atexit, os, runpy, sys
def peak():
    with open("/proc/self/status") as status:
        kib = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(os.environ["REALSHAPE_PEAK_FILE"], "w") as out:
        out.write(kib)
atexit.register(peak)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def flexmoe(*args: str) -> list[str]:
    return ["flexmoe.cli", *args]


def measured(argv: list[str]) -> dict:
    """Run module `argv[0]` with arguments `argv[1:]` in a fresh child: its wall seconds and peak RSS."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as log, tempfile.NamedTemporaryFile("r") as peak:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "REALSHAPE_PEAK_FILE": peak.name}
        done = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *argv], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT, check=False)
        log.seek(0)
        output = log.read().decode(errors="replace")
        kib = peak.read().strip()
    if done.returncode != 0 or not kib:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n{output[-3000:]}")
    return {"seconds": time.perf_counter() - start, "peak_rss": int(kib) * 1024, "output": output}


def shape_rows(name: str, work: pathlib.Path) -> dict:
    """Build `name` at cut depth in `work`, plan it, run every command on it, time its selection."""
    import torch

    from flexmoe.config import load_config
    from flexmoe.models import moe_layers
    from flexmoe.cost.plan import meta_base, plan
    from flexmoe.shapes import random_checkpoint, shape_config

    model = work / "model"
    random_checkpoint(name, model, layers=LAYERS[name])
    run_config = [*RUN, f"model={model}"]
    lora_config = [*run_config, "flex.graft_train=lora"]
    planned = plan(load_config(None, run_config), batch=BATCH, length=LENGTH, device_type="cpu")
    planned_lora = plan(load_config(None, lora_config), batch=BATCH, length=LENGTH, device_type="cpu")
    run_dir, lora_dir = work / "run", work / "run-lora"
    sets, lora_sets = ([arg for item in items for arg in ("--set", item)] for items in (run_config, lora_config))
    commands = {
        "run": flexmoe("run", *sets, "--output-dir", str(run_dir)),
        "run-lora": flexmoe("run", *lora_sets, "--output-dir", str(lora_dir)),
        "graft": flexmoe("graft", "--model", str(model), "--max-examples", "4", "--max-length", str(LENGTH),
                         "--batch-size", str(BATCH), "--dtype", "bfloat16", "--device", "cpu", "--json"),
        "generate": flexmoe("generate", "--run", str(run_dir), "--client", "0", "--prompt", "Name a colour.",
                            "--max-new-tokens", "8"),
        "export": flexmoe("export", "--run", str(run_dir), "--client", "0", "--out", str(work / "export")),
        "select": ["benchmarks.bench_realshape", "select", str(model)],
    }
    if os.environ.get("FLEXMOE_REALSHAPE_QUICK"):  # the run only: the plan's check and the personal bytes
        commands = {"run": commands["run"]}
    results = {}
    for label, argv in commands.items():
        print(f"     {label}", flush=True)
        results[label] = measured(argv)
    personal = {mode: json.loads((d / "summary.json").read_text()).get("personal_bytes_per_client")
                for mode, d in (("full", run_dir), ("lora", lora_dir)) if (d / "summary.json").is_file()}
    selection = None
    if "select" in results:
        selection = json.loads(results["select"].pop("output").strip().splitlines()[-1])
    for result in results.values():
        result.pop("output", None)
    moe = len(moe_layers(meta_base(shape_config(name, LAYERS[name]), torch.bfloat16)))
    return {"shape": name, "layers": LAYERS[name], "moe_layers": moe, "plan": planned.to_json(),
            "plan_lora": planned_lora.to_json(), "commands": results, "personal_bytes": personal, "selection": selection}


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
    """Every shape, or `names` (also from $FLEXMOE_REALSHAPE, comma-separated). A shape's raw row is kept
    in `realshape-<date>.json` beside the report, so shapes run one at a time (one multi-GB process each)
    add up to one day's report; a shape run again replaces its row."""
    names = names or [n for n in os.environ.get("FLEXMOE_REALSHAPE", "").split(",") if n] or sorted(LAYERS)
    raw = results_dir / f"realshape-{datetime.date.today().isoformat()}.json"
    rows = {r["shape"]: r for r in json.loads(raw.read_text())} if raw.is_file() else {}
    for name in names:
        print(f"   realshape: {name} at {LAYERS[name]} layer(s)", flush=True)
        work = pathlib.Path(tempfile.mkdtemp(prefix=f"realshape-{name}-"))
        try:
            rows[name] = shape_rows(name, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        ordered = [rows[n] for n in sorted(rows)]
        write_text_atomic(raw, json.dumps(ordered, indent=1) + "\n")
        write_result(results_dir, "realshape", report(ordered), echo=name == names[-1])  # each shape as it finishes


def report(rows: list[dict]) -> list[str]:
    gib = 2**30

    def versus(planned: dict, run: dict) -> str:
        ratio = run["peak_rss"] / planned["peak_bytes"]
        return (f"{planned['peak_bytes'] / gib:.2f} | {run['peak_rss'] / gib:.2f} | {ratio:.2f} "
                f"({'yes' if abs(ratio - 1) <= TARGET else 'no'})")

    lines = [header_markdown("Real widths at cut depth: every shipped shape end to end on the CPU", COMMAND),
             __doc__.split("\n\n", 1)[1].strip(), "", f"Run config: `{' '.join(RUN)}`; the LoRA-mode run adds "
             "`flex.graft_train=lora`.", "",
             "| shape | layers | parameters | graft | planned peak (GiB) | run peak RSS (GiB) | measured / planned "
             "(within 20%) | run s |", "|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        c = r["commands"]
        for mode, planned, run in (("full", r["plan"], c["run"]), ("lora", r["plan_lora"], c.get("run-lora"))):
            if run is None:
                continue
            lines.append(f"| {r['shape']} | {r['layers']} | {planned['total_params'] / 1e9:.2f} B | {mode} | "
                         f"{versus(planned, run)} | {run['seconds']:.0f} |")
    others = [r for r in rows if "graft" in r["commands"]]
    if others:
        lines += ["", "The other commands, each in its own process (peak RSS, GiB; seconds):", "",
                  "| shape | graft | generate | export |", "|---|---:|---:|---:|"]
    for r in others:
        c = r["commands"]
        cells = [f"{c[k]['peak_rss'] / gib:.2f} ({c[k]['seconds']:.0f} s)" for k in ("graft", "generate", "export")]
        lines.append(f"| {r['shape']} | " + " | ".join(cells) + " |")
    lines += ["", "FLEx personal state per client (bytes; the plan / a run's `personal_bytes_per_client`); "
              "graft_train = lora stores only the selection, the gate, the router rows and the graft's LoRA:", "",
              "| shape | MoE layers | full: plan | full: run | lora: plan | lora: run |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = r["personal_bytes"]
        lines.append(f"| {r['shape']} | {r['moe_layers']} | {r['plan']['personal_state_bytes']:,} | "
                     f"{b['full']:,} | {r['plan_lora']['personal_state_bytes']:,} | "
                     f"{format(b['lora'], ',') if 'lora' in b else 'not run'} |")
    lines += ["", "Plan parts (GiB): runtime = the Python process before any model; load = weights + the largest "
              "tensor in conversion; step = one client step's peak (weights, optimiser state, forward+backward).", "",
              "| shape | runtime | load | step | frozen weights (bf16) |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        p = r["plan"]
        lines.append(f"| {r['shape']} | {p['runtime_bytes'] / gib:.2f} | {p['load_peak'] / gib:.2f} | "
                     f"{p['memory']['peak'] / gib:.2f} | {p['memory']['weights_frozen'] / gib:.2f} |")
    selected = sorted((r for r in rows if r["selection"]), key=lambda r: r["selection"]["experts"])
    if selected:
        lines += ["", "Grafting selection (`select_experts`, k = 1, random calibration tokens, one thread):", "",
                  "| shape | experts | MoE layers | tokens | seconds per layer | peak selection tensors (MiB) |",
                  "|---|---:|---:|---:|---:|---:|"]
    for r in selected:
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

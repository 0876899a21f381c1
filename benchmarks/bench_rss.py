"""Peak memory of the in-process simulation for 2, 8 and 16 clients, and per phase of one run
(`phases_section`: the data, each evaluation, grafting, local training, the report).

Each client count runs `REPEATS` times, each in its own fresh process (`python -m benchmarks.bench_rss N DIR`): one
FLEx round on the shipped tiny base where every client grafts, trains and is evaluated, with
the same data per client (`data.max_train_per_client`), so that the growth per extra client
is what the engine keeps per client. Peak RSS is the child's `ru_maxrss` (the smallest over the
repeats); the growth per extra client is the least-squares slope of peak RSS over the client
counts (and, for reference, the difference between consecutive counts). The target compares
the growth per extra client with the bytes of one client's personal state (graft + gate, as
written to `clients/<id>/personal.safetensors`): one frozen base serves every client, so a
client should cost about its personal state, not a model copy.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile

from benchmarks.machine import header_markdown, write_result

CLIENTS = (2, 8, 16)
REPEATS = 2  # fresh processes per client count; the smallest peak is kept (allocator noise only adds)
TARGET = 3.0  # growth per extra client <= TARGET x one client's personal-state bytes
OVERRIDES = [
    "method=flex", "rounds=1", "data.max_train_per_client=64", "train.local_steps=2",
    "eval.max_test_examples=2", "eval.max_new_tokens=4", "eval.knowledge_max_docs=4", "eval.max_probes=4",
]
COMMAND = "nice -n 5 .venv/bin/python -m benchmarks rss"
ROOT = pathlib.Path(__file__).resolve().parent.parent


def child(num_clients: int, run_dir: pathlib.Path) -> dict:
    """One simulation in this process; its peak RSS and one client's personal-state bytes."""
    from flexmoe.config import load_config
    from flexmoe.engine.progress import Progress
    from flexmoe.engine.simulation import Simulation

    config = load_config(None, [*OVERRIDES, f"num_clients={num_clients}", f"clients_per_round={num_clients}"])
    Simulation(config, run_dir, Progress()).run()
    personal = sorted(run_dir.glob("clients/0/**/personal.safetensors"))
    return {"clients": num_clients, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "personal_bytes": personal[-1].stat().st_size}


def measure(num_clients: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run([sys.executable, "-m", "benchmarks.bench_rss", str(num_clients), f"{tmp}/run"],
                                cwd=ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"rss child with {num_clients} clients failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def counts_section() -> list[str]:
    """Peak RSS per client count and the growth per extra client."""
    samples = {n: [] for n in CLIENTS}
    for _ in range(REPEATS):  # alternate the counts, so that the machine's state hits each alike
        for n in CLIENTS:
            samples[n].append(measure(n))
    peaks = {n: min(run["peak_rss"] for run in runs) for n, runs in samples.items()}
    personal = samples[CLIENTS[0]][0]["personal_bytes"]
    lines = ["## Peak RSS per client count", "", __doc__.split("\n\n", 2)[1].strip(), "",
             f"Run config overrides: `{' '.join(OVERRIDES)}`.", "",
             "| clients | peak RSS per run (MB) | kept (MB) | growth per extra client vs the previous row (MB) |",
             "|---:|---|---:|---:|"]
    previous = None
    for n in CLIENTS:
        runs = ", ".join(f"{run['peak_rss'] / 1e6:,.1f}" for run in samples[n])
        step = "-" if previous is None else f"{(peaks[n] - peaks[previous]) / (n - previous) / 1e6:,.2f}"
        lines.append(f"| {n} | {runs} | {peaks[n] / 1e6:,.1f} | {step} |")
        previous = n
    slope = least_squares_slope(list(CLIENTS), [peaks[n] for n in CLIENTS])
    ratio = slope / personal
    lines += ["", f"One client's personal state: {personal / 1e6:.2f} MB. Growth per extra client (slope over "
              f"{', '.join(map(str, CLIENTS))} clients): {slope / 1e6:.2f} MB = {ratio:.2f}x the personal state "
              f"(target <= {TARGET:g}x: {'met' if ratio <= TARGET else 'missed'}).", "",
              f"Load average when done: {os.getloadavg()[0]:.1f} (shared machine; RSS does not depend on load).", ""]
    return lines


def main(results_dir: pathlib.Path) -> None:
    lines = [header_markdown("In-process simulation: peak memory per client count and per phase", COMMAND),
             *counts_section(), *phases_section()]
    write_result(results_dir, "rss", lines)


# ---- peak RSS per phase of one run ----------------------------------------------------------------
# A two-client FLEx run on the builtin data at the default budget's shapes (batch 8, length 256, the
# evaluation batch sizes), with fewer rounds, steps and evaluation items so that it fits the shared machine.
PHASES_DOC = """One two-client FLEx run in a fresh process (`python -m benchmarks.bench_rss phases DIR`), each
phase's peak RSS measured on its own: the process's peak (VmHWM) is reset as a phase begins (Linux
`/proc/self/clear_refs`) and read as it ends. What a phase adds over the RSS it began with is what it
allocates and keeps, or allocates at once; freed memory the allocator keeps shows in the phases after it."""
MALLOC_KEYS = ("MALLOC_ARENA_MAX", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
PHASE_OVERRIDES = ["method=flex", "num_clients=2", "rounds=2", "train.local_steps=10", "eval.every=0",
                   "eval.max_test_examples=16", "eval.knowledge_max_docs=32", "eval.max_probes=32", "runtime.threads=1"]
# (module, attribute, phase): the functions of a run each phase is, in the order a run reaches them
PHASES = (
    ("flexmoe.engine.simulation", "load_model", "load the base"),
    ("flexmoe.engine.simulation", "partition_data", "read and partition the data"),
    ("flexmoe.engine.driver", "base_knowledge", "base knowledge (server)"),
    ("flexmoe.clients", "make_client", "tokenise a client's training data (per client)"),
    ("flexmoe.engine.client:ClientRunner", "evaluate_base", "base evaluation (per client)"),
    ("flexmoe.engine.client:ClientRunner", "graft", "grafting (per client)"),
    ("flexmoe.engine.client:ClientRunner", "train", "local training (per client and round)"),
    ("flexmoe.engine.client:ClientRunner", "evaluate", "client evaluation (per client)"),
    ("flexmoe.engine.driver", "global_knowledge", "global-model knowledge (server)"),
    ("flexmoe.engine.driver", "write_run_report", "report and plots"),
)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def _reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM) to its current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def phases_child(run_dir: pathlib.Path) -> dict:
    """One run in this process, each phase's peak RSS measured on its own (VmHWM reset as it begins):
    {phase: {calls, peak, growth, end}} in bytes (peak, and growth = peak - RSS at the call's start: the
    largest over its calls; end: RSS after its last call), and the whole run's peak. With
    FLEXMOE_BENCH_BEFORE=1 the run tokenises each client in one call and never trims the heap, as before
    2026-12-02."""
    import functools
    import importlib

    from flexmoe.config import load_config
    from flexmoe.engine.progress import Progress
    from flexmoe.engine.simulation import Simulation

    measured: dict[str, dict] = {}
    between = {"peak": 0}  # the code between the phases (sampling, aggregation, checkpoints ...)

    def instrument(owner, name: str, phase: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def measured_call(*args, **kwargs):
            start = _status("VmRSS")
            between["peak"] = max(between["peak"], _status("VmHWM"))  # since the last phase ended
            _reset_peak()
            try:
                return original(*args, **kwargs)
            finally:
                entry = measured.setdefault(phase, {"calls": 0, "peak": 0, "growth": 0})
                peak = _status("VmHWM")
                entry.update(calls=entry["calls"] + 1, peak=max(entry["peak"], peak),
                             growth=max(entry["growth"], peak - start), end=_status("VmRSS"))
                _reset_peak()  # what follows until the next phase is "between the phases"

        setattr(owner, name, measured_call)

    if os.environ.get("FLEXMOE_BENCH_BEFORE") == "1":
        import flexmoe.data.tokens
        import flexmoe.heap

        flexmoe.data.tokens.TOKENIZE_CHUNK = 10**9
        flexmoe.heap.ENABLED = False
    for where, name, phase in PHASES:
        module, _, cls = where.partition(":")
        owner = importlib.import_module(module)
        instrument(getattr(owner, cls) if cls else owner, name, phase)
    Simulation(load_config(None, PHASE_OVERRIDES), run_dir, Progress()).run()
    between["peak"] = max(between["peak"], _status("VmHWM"))
    # resetting VmHWM resets ru_maxrss too: the run's peak is the largest of the phases' and the gaps'
    peak = max([between["peak"], *(entry["peak"] for entry in measured.values())])
    return {"phases": measured, "between_peak": between["peak"], "peak_rss": peak,
            "environment": {k: os.environ[k] for k in (*MALLOC_KEYS, "FLEXMOE_BENCH_BEFORE") if k in os.environ}}


def measure_phases(environment: dict[str, str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run([sys.executable, "-m", "benchmarks.bench_rss", "phases", f"{tmp}/run"], cwd=ROOT,
                                env={**os.environ, **environment}, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"rss phases child failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# what the variants of the phase table change: "before" restores what the run did before the fixes
# of 2026-12-02, "after" is the code as it is; the allocator variants add glibc settings to "after"
VARIANTS = (
    ("before (one tokeniser call per client, no trim)", {"FLEXMOE_BENCH_BEFORE": "1"}),
    ("after (chunked tokenising, malloc_trim after it and after training)", {}),
    ("after + MALLOC_MMAP_THRESHOLD_=131072", {"MALLOC_MMAP_THRESHOLD_": "131072"}),
)


def phases_section() -> list[str]:
    """Peak RSS per phase of one two-client run, for each of `VARIANTS`, each in a fresh process."""
    with concurrent.futures.ThreadPoolExecutor(len(VARIANTS)) as pool:  # side by side: RSS does not depend on load
        runs = dict(zip([n for n, _ in VARIANTS], pool.map(measure_phases, [env for _, env in VARIANTS])))
    names = [name for name, _ in VARIANTS]
    lines = ["## Peak RSS per phase", "", PHASES_DOC, "", f"Run config overrides: `{' '.join(PHASE_OVERRIDES)}`.", "",
             "Each cell: the phase's peak RSS (MB) / what it added over the RSS it started from (the largest over "
             "its calls).", "",
             "| phase | calls | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for _, _, phase in PHASES:
        cells = []
        for name in names:
            entry = runs[name]["phases"].get(phase)
            cells.append("-" if entry is None else f"{entry['peak'] / 1e6:,.0f} / +{entry['growth'] / 1e6:,.0f}")
        calls = runs[names[0]]["phases"].get(phase, {}).get("calls", 0)
        lines.append(f"| {phase} | {calls} | " + " | ".join(cells) + " |")
    lines.append("| between the phases (peak) | | " + " | ".join(f"{runs[n]['between_peak'] / 1e6:,.0f}" for n in names) + " |")
    lines.append("| **whole run** (peak) | | " + " | ".join(f"**{runs[n]['peak_rss'] / 1e6:,.0f}**" for n in names)
                 + " |")
    lines += ["", f"Load average when done: {os.getloadavg()[0]:.1f} (shared machine; RSS does not depend on load).",
              ""]
    return lines


def least_squares_slope(xs: list[float], ys: list[float]) -> float:
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)


if __name__ == "__main__":
    if sys.argv[1] == "phases":
        print(json.dumps(phases_child(pathlib.Path(sys.argv[2]))))
    else:
        print(json.dumps(child(int(sys.argv[1]), pathlib.Path(sys.argv[2]))))

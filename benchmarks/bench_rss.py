"""Peak memory of the in-process simulation for 2, 8 and 16 clients.

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


def main(results_dir: pathlib.Path) -> None:
    samples = {n: [] for n in CLIENTS}
    for _ in range(REPEATS):  # alternate the counts, so that the machine's state hits each alike
        for n in CLIENTS:
            samples[n].append(measure(n))
    peaks = {n: min(run["peak_rss"] for run in runs) for n, runs in samples.items()}
    personal = samples[CLIENTS[0]][0]["personal_bytes"]
    lines = [header_markdown("In-process simulation: peak memory per client count", COMMAND),
             __doc__.split("\n\n", 1)[1].strip(), "", f"Run config overrides: `{' '.join(OVERRIDES)}`.", "",
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
    write_result(results_dir, "rss", lines)


def least_squares_slope(xs: list[float], ys: list[float]) -> float:
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)


if __name__ == "__main__":
    print(json.dumps(child(int(sys.argv[1]), pathlib.Path(sys.argv[2]))))

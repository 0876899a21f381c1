"""A population of simulated clients on one machine: peak memory, seconds per round and disk per
client at 10, 100 and 1,000 clients, 10 sampled per round, on the builtin data.

Each population runs in its own fresh process (`python -m benchmarks.bench_population N DIR`):
FLEx on the shipped tiny base, `ROUNDS` rounds of `clients_per_round = 10`, the same 10
clients evaluated (`eval.clients = 10`) at the last round only. The in-process engine tokenises
only the clients a round needs and keeps every client's state on disk (`clients.ClientPool`),
so peak RSS and the time of a round should not depend on the population. A round's time is split
into the first-time grafting of the round's new clients (every client grafts once, before its
first round: at 10 clients all graft at round 0, at 1,000 nearly every sampled client is new)
and the rest (local training, aggregation, checkpoint); the target is on the rest.
Peak RSS is also reported at the end of each phase (`ru_maxrss`, a running peak): model and
data loaded, round 0, the training rounds, the last round's evaluation.

Every client trains on the same number of examples (`data.max_train_per_client = 64`, as the `rss`
benchmark), so that what changes between the rows is the population alone. Reduced budget so that
it fits the shared 2-core CPU (say so wherever the numbers are quoted): `train.local_steps = 3`,
small evaluation (4 examples, 8 new tokens, 8 documents, 8 probes). The three populations run side
by side, each in its own process, so that they share the machine's state alike.
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

from benchmarks.machine import header_markdown, write_result

POPULATIONS = (10, 100, 1000)
PER_ROUND = 10
ROUNDS = 3  # two training rounds, then the last round, which also evaluates
TARGET = 1.2  # at 1,000 clients: peak RSS and seconds per round (without first-time grafting) <= 1.2x those at 10
OVERRIDES = [
    "method=flex", f"rounds={ROUNDS}", f"clients_per_round={PER_ROUND}", f"eval.clients={PER_ROUND}", "eval.every=0",
    "data.max_train_per_client=64", "train.local_steps=3", "eval.max_test_examples=4", "eval.max_new_tokens=8", "eval.knowledge_max_docs=8",
    "eval.max_probes=8", "runtime.threads=1",
]
COMMAND = "nice -n 15 .venv/bin/python -m benchmarks population"
ROOT = pathlib.Path(__file__).resolve().parent.parent


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(num_clients: int, run_dir: pathlib.Path) -> dict:
    """One run in this process: its rounds' times, grafting time per round, peak RSS per phase, disk per client."""
    from flexmoe.config import load_config
    from flexmoe.engine.client import ClientRunner
    from flexmoe.engine.progress import Progress
    from flexmoe.engine.simulation import Simulation

    grafting = {"round": 0, "seconds": {}}
    original_graft = ClientRunner.graft

    def timed_graft(self, client):
        started = time.monotonic()
        original_graft(self, client)
        seconds = grafting["seconds"]
        seconds[grafting["round"]] = seconds.get(grafting["round"], 0.0) + time.monotonic() - started

    class Clock(Progress):
        """Round boundaries and the running peak RSS at each."""

        def __init__(self):
            self.marks: list[tuple[str, float, int]] = []

        def round_started(self, round_index, sampled):
            grafting["round"] = round_index
            self.marks.append((f"round {round_index}", time.monotonic(), peak_rss()))

        def message(self, text):
            if "evaluating client" in text and not any(m[0] == "evaluation" for m in self.marks) and "round 0" not in text:
                self.marks.append(("evaluation", time.monotonic(), peak_rss()))

        def close(self):
            self.marks.append(("end", time.monotonic(), peak_rss()))

    ClientRunner.graft = timed_graft
    config = load_config(None, [*OVERRIDES, f"num_clients={num_clients}"])
    clock = Clock()
    started, rss_start = time.monotonic(), peak_rss()
    Simulation(config, run_dir, clock).run()
    marks = [("start", started, rss_start), *clock.marks]
    bounds = [m for m in marks if m[0].startswith("round ") or m[0] == "end"]  # a round ends where the next begins
    rounds = {int(name.split()[1]): {"seconds": t_next - t, "graft_seconds": grafting["seconds"].get(int(name.split()[1]), 0.0)}
              for (name, t, _), (_, t_next, _) in zip(bounds, bounds[1:])}
    first_round = next(m for m in marks if m[0] == "round 1")
    phases = {"load + round 0": first_round[2],  # each: the running peak when the next phase begins
              **{f"+ round {int(m[0].split()[1]) - 1}": m[2] for m in marks if m[0].startswith("round ") and m[0] != "round 1"},
              f"+ round {ROUNDS} with its evaluation": marks[-1][2]}
    client_dirs = [d for d in (run_dir / "clients").iterdir() if d.is_dir()]
    disk = [sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) for d in client_dirs]
    return {"clients": num_clients, "peak_rss": peak_rss(), "rounds": rounds, "phases": phases,
            "round0_graft_seconds": grafting["seconds"].get(0, 0.0),
            "client_dirs": len(client_dirs), "disk_per_client": sum(disk) / len(disk),
            "wall": time.monotonic() - started}


def measure_all(populations) -> dict[int, dict]:
    """Every population's child, started together (side by side), -> {population: its result}."""
    with tempfile.TemporaryDirectory() as tmp:
        children = {n: subprocess.Popen([sys.executable, "-m", "benchmarks.bench_population", str(n), f"{tmp}/run-{n}"],
                                        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, "OMP_NUM_THREADS": "1"})
                    for n in populations}
        results = {}
        for n, child_process in children.items():
            out, err = child_process.communicate()
            if child_process.returncode != 0:
                raise RuntimeError(f"population child with {n} clients failed:\n{err[-3000:]}")
            results[n] = json.loads(out.strip().splitlines()[-1])
    return results


def train_seconds(run: dict) -> float:
    """Mean seconds of the training rounds (all but the last, which also evaluates) without first-time grafting."""
    rounds = [r for i, r in run["rounds"].items() if int(i) < ROUNDS]
    return sum(r["seconds"] - r["graft_seconds"] for r in rounds) / len(rounds)


def main(results_dir: pathlib.Path) -> None:
    runs = measure_all(POPULATIONS)
    first, last = runs[POPULATIONS[0]], runs[POPULATIONS[-1]]
    lines = [header_markdown("A population of simulated clients: memory, time per round, disk per client", COMMAND),
             __doc__.split("\n\n", 1)[1].strip(), "", f"Run config overrides: `{' '.join(OVERRIDES)}`.", "",
             "| clients | peak RSS (MB) | s/round, training rounds (without first-time grafting) | grafting s/round "
             "| last round (with evaluation) s | client dirs written | disk per client (MB) | run wall s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, run in runs.items():
        training = [r for i, r in run["rounds"].items() if int(i) < ROUNDS]
        graft = sum(r["graft_seconds"] for r in training) / len(training)
        lines.append(f"| {n:,} | {run['peak_rss'] / 1e6:,.1f} | {train_seconds(run):.2f} | {graft:.2f} "
                     f"| {run['rounds'][str(ROUNDS)]['seconds']:.1f} | {run['client_dirs']} "
                     f"| {run['disk_per_client'] / 1e6:.2f} | {run['wall']:.0f} |")
    lines += ["", "Peak RSS (MB) at the end of each phase (a running peak):", "",
              "| clients | " + " | ".join(first["phases"]) + " |", "|---:|" + "---:|" * len(first["phases"])]
    for n, run in runs.items():
        lines.append(f"| {n:,} | " + " | ".join(f"{v / 1e6:,.1f}" for v in run["phases"].values()) + " |")
    rss_ratio = last["peak_rss"] / first["peak_rss"]
    time_ratio = train_seconds(last) / train_seconds(first)
    verdict = lambda ratio: "met" if ratio <= TARGET else "missed"  # noqa: E731
    lines += ["", f"At {POPULATIONS[-1]:,} against {POPULATIONS[0]} clients: peak RSS {rss_ratio:.2f}x "
              f"(target <= {TARGET}x: {verdict(rss_ratio)}), seconds per training round {time_ratio:.2f}x "
              f"(target <= {TARGET}x: {verdict(time_ratio)}).", "",
              f"Load average when done: {os.getloadavg()[0]:.1f} (shared machine: times are noisy; the three "
              "runs ran side by side).", ""]
    write_result(results_dir, "population", lines)


if __name__ == "__main__":
    print(json.dumps(child(int(sys.argv[1]), pathlib.Path(sys.argv[2]))))

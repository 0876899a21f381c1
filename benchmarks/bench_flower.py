"""Wall time of the same FLEx job in-process and as a Flower simulation.

The job: FLEx on the shipped tiny base and builtin data, 2 clients (both sampled every round),
`CONFIG` below. It runs as a user would run it, each in a fresh process: `flexmoe run` (the
in-process engine) and `flwr run . local` with 2 SuperNodes (a local SuperLink, Ray, one
ClientApp per client; FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1, its own FLWR_HOME and
ports, and every process it leaves behind stopped by pid afterwards). Each runs with 1 and with
3 rounds: half the difference is the cost of one more round, the rest is the fixed cost
(imports, start-up, round-0 evaluation, grafting, final evaluation). Costs are wall seconds and
CPU seconds of every process of the job (the command's own children, and the SuperLink's
process tree read from /proc before it is stopped): on the shared machine the CPU seconds are
the comparable figure.
"""

from __future__ import annotations

import os
import pathlib
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time

from benchmarks.machine import header_markdown, write_result

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = pathlib.Path(sys.executable).parent
CONFIG = """\
rounds = {rounds}
num_clients = 2
clients_per_round = 2
[data]
max_train_per_client = 32
[train]
local_steps = 4
[eval]
max_test_examples = 2
max_new_tokens = 4
knowledge_max_docs = 4
max_probes = 4
"""
ROUNDS = (1, 3)
COMMAND = "nice -n 5 .venv/bin/python -m benchmarks flower"
FLOWER_CPU_NOTE = ("Flower's CPU seconds are a lower bound: a process that exits and is reaped outside the tree read from /proc (ClientApp processes are started per message) is not counted; the likely reason one more Flower round shows less CPU than the in-process training alone costs.")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def in_process(config: pathlib.Path, out: pathlib.Path) -> tuple[float, float]:
    """(wall s, CPU s) of `flexmoe run`."""
    started, cpu = time.perf_counter(), children_cpu()
    subprocess.run([str(BIN / "flexmoe"), "run", "--config", str(config), "--output-dir", str(out)],
                   cwd=ROOT, check=True, capture_output=True, text=True)
    return time.perf_counter() - started, children_cpu() - cpu


def flower(config: pathlib.Path, out: pathlib.Path, home: pathlib.Path) -> tuple[float, float]:
    """(wall s, CPU s) of `flwr run . local` and the processes it starts."""
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    started, cpu = time.perf_counter(), children_cpu()
    background_cpu = 0.0
    try:
        result = subprocess.run(
            [str(BIN / "flwr"), "run", ".", "local", "--stream", "--federation-config",
             "num-supernodes=2 client-resources-num-cpus=1", "--run-config", f"config='{config}' output-dir='{out}'"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        elapsed = time.perf_counter() - started
    finally:  # `flwr run . local` leaves its SuperLink (and Ray) running
        background_cpu = stop_processes_mentioning(str(home))
    if result.returncode != 0 or not (out / "summary.json").exists():
        raise RuntimeError(f"flwr run failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return elapsed, children_cpu() - cpu + background_cpu


def stop_processes_mentioning(text: str) -> float:
    """SIGTERM, then SIGKILL, the live processes whose command line contains `text`, and their
    descendants; returns the CPU seconds they (and the children they reaped) used."""
    parents, cpu = {}, {}
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            parents[int(entry.name)] = (int(fields[1]), text in cmdline)
            cpu[int(entry.name)] = sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # u, s, cu, cs
    marked = {pid for pid, (_, mentions) in parents.items() if mentions and pid != os.getpid()}
    grew = True
    while grew:
        children = {pid for pid, (parent, _) in parents.items() if parent in marked} - marked
        grew = bool(children)
        marked |= children
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in marked:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while sig == signal.SIGTERM and time.monotonic() < deadline and any(_alive(pid) for pid in marked):
            time.sleep(0.2)
    return sum(cpu[pid] for pid in marked)


def _alive(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def main(results_dir: pathlib.Path) -> None:
    load_start = os.getloadavg()[0]
    times: dict[tuple[str, int], tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        for rounds in ROUNDS:  # alternate the engines, so that load from other jobs hits both alike
            config = tmp / f"rounds{rounds}.toml"
            config.write_text(CONFIG.format(rounds=rounds))
            times[("in-process", rounds)] = in_process(config, tmp / f"inproc{rounds}")
            times[("flower", rounds)] = flower(config, tmp / f"flower{rounds}", tmp / f"flwr-home{rounds}")
    lines = [header_markdown("One round: in-process vs Flower simulation", COMMAND), __doc__.split("\n\n", 1)[1].strip(),
             "", "Run config:", "", "```toml", CONFIG.format(rounds="1 or 3").strip(), "```", "",
             "| engine | measure | 1 round | 3 rounds | one more round | fixed cost |", "|---|---|---:|---:|---:|---:|"]
    per_round = {}
    for engine in ("in-process", "flower"):
        for index, measure in enumerate(("wall s", "CPU s")):
            one, three = times[(engine, 1)][index], times[(engine, 3)][index]
            per_round[(engine, measure)] = (three - one) / 2
            lines.append(f"| {engine} | {measure} | {one:.1f} | {three:.1f} | {(three - one) / 2:.1f} | "
                         f"{one - (three - one) / 2:.1f} |")
    ratios = ", ".join(f"{measure} {per_round[('flower', measure)] / per_round[('in-process', measure)]:.2f}x"
                       for measure in ("CPU s", "wall s") if per_round[("in-process", measure)] > 0)
    lines += ["", f"Flower / in-process, one more round: {ratios}; whole 1-round job: CPU s "
              f"{times[('flower', 1)][1] / times[('in-process', 1)][1]:.2f}x, wall s "
              f"{times[('flower', 1)][0] / times[('in-process', 1)][0]:.2f}x.", "", FLOWER_CPU_NOTE, "",
              f"Load average (1 min) at start {load_start:.1f}, at end {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
              "cores: the machine was shared with other jobs, so wall times are noisy (a negative or tiny "
              "'one more round' means the noise exceeded a round's work).", ""]
    write_result(results_dir, "flower", lines)

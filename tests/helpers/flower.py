"""Real Flower processes for the tests that start them: free ports, environments, a loopback
deployment (SuperLink, SuperNodes, apps), reading a run's records, and stopping processes by pid."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from helpers.paths import REPO_ROOT

ROOT = REPO_ROOT  # the repository: the Flower app and scripts/flower-deploy.sh


BIN = Path(sys.executable).parent


def flower_env(home: Path) -> dict:
    return {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}


def free_base_port() -> int:
    """A base port whose block (base .. base+4) is free on loopback."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + 4 < 65536 and all(_free(base + i) for i in range(5)):
            return base
    raise RuntimeError("no free port block")


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose full command line contains `text` (our temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # exited meanwhile
            continue
        if text in args and alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def stop(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    for pid in pids:
        while time.monotonic() < deadline and alive(pid):
            time.sleep(0.1)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is stopped
        return not Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0].startswith("Z")
    except OSError:
        return False


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def committed_rounds(run_dir: Path) -> list[int]:
    """Rounds whose server record is in the run's metrics (0 = round zero) so far."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return [r["round"] for r in lines if r["kind"] == "server"]


def client_dir(state_root: Path, run_dir: Path, client: int) -> Path:
    """Where a SuperNode started with `state-dir=state_root` keeps client `client`'s state of a run."""
    from flexmoe.engine.flower.client_app import run_key

    return state_root / run_key(run_dir) / str(client)


def without_bytes(records: list[dict]) -> list[dict]:
    """Records without what each engine measures on its own: bytes, timings, memory peaks."""
    from flexmoe.models.device import MEASURED_KEYS

    return [{k: v for k, v in r.items() if not k.startswith("bytes_") and k not in MEASURED_KEYS} for r in records]


# ---- deployments: a SuperLink and SuperNodes started by scripts/flower-deploy.sh ------------------
class Deployment:
    """A loopback deployment in `work`, its processes known by their pid files; `flwr` talks to it
    through the connection the script writes into this deployment's own FLWR_HOME."""

    script = ROOT / "scripts" / "flower-deploy.sh"

    def __init__(self, work: Path, audit: bool = False):
        self.work = work
        self.env = {**flower_env(work / "flwr-home"), **({"FLEXMOE_AUDIT": "1"} if audit else {})}

    def deploy(self, *args: str) -> None:
        done = subprocess.run([str(self.script), *args], env=self.env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr

    def pid(self, name: str) -> int:
        return int((self.work / f"{name}.pid").read_text())

    def state(self, node: int) -> Path:
        return self.work / f"node-{node}" / "state"

    def submit(self, log: Path, run_config: str, round_timeout: float = 150.0) -> subprocess.Popen:
        """`flwr run . flexmoe-deploy` in the background, its output streamed into `log`."""
        with log.open("w") as out:
            return subprocess.Popen(
                [str(BIN / "flwr"), "run", ".", "flexmoe-deploy", "--stream", "--run-config",
                 f"connect-timeout=120.0 round-timeout={round_timeout} {run_config}"],
                cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def run(self, log: Path, run_config: str, timeout: float = 420, round_timeout: float = 150.0) -> str:
        process = self.submit(log, run_config, round_timeout)
        try:
            assert process.wait(timeout=timeout) == 0, log.read_text()[-4000:]
        finally:
            stop_process(process)
        return log.read_text()

    def stop(self) -> None:
        pids = [int(p.read_text()) for p in self.work.glob("*.pid")]
        # ClientApps name neither our directory nor their SuperNode: find them below it before it goes
        below = [child for pid in pids for child in descendants(pid)]
        subprocess.run([str(self.script), "stop", str(self.work)], env=self.env, timeout=60)
        root = str(self.work.parent)  # holds the certificates a ServerApp's command line names
        stop(below + processes_mentioning(root))  # anything Flower started on our behalf
        assert pids and not any(alive(pid) for pid in pids + below)
        assert not processes_mentioning(root)


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        stop([process.pid])
        process.wait()


def descendants(pid: int) -> list[int]:
    """Pids of the live processes below `pid` (children, their children, ...)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().split(")")[-1].split()[1])
            except OSError:
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier and alive(p)]
        found += children
        frontier = children
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def clientapps_of(supernode: int) -> list[int]:
    return [p for p in descendants(supernode) if "flwr-clientapp" in command_line(p)]


def kill_machine(pid: int) -> None:
    """SIGKILL a SuperNode and everything below it, as when its machine dies."""
    for victim in [pid, *descendants(pid)]:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


def node_ids_in_log(path: Path) -> list[str]:
    """The node ids a SuperNode's log announces, one per start."""
    return re.findall(r"SuperNode ID: (\d+)", path.read_text())

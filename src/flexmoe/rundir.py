"""The run directory: its layout (every file name, and what makes a directory a run), the
metrics log, the server checkpoint and client states.

A round commits when `checkpoints/server.safetensors` (global weights, server-optimiser state
and the round number, in one file) is replaced. Clients write their new state to
`clients/<id>/pending/` during the round; once the checkpoint commits, pending files are
moved into `clients/<id>/`. On resume, pending states of a round that never committed are
dropped, so every file matches the checkpoint's round. Every tensor file carries a checksum
(`flexmoe.files`): a truncated or corrupted one is refused, never loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from flexmoe.errors import FlexmoeError
from flexmoe.files import load_checked, save_checked, write_text_atomic
from flexmoe.tensors import Tensors, strip_prefix, with_prefix

CONFIG_FILE = "config.toml"  # the resolved run config
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"
SERVER_CHECKPOINT = "checkpoints/server.safetensors"
INITIAL_WEIGHTS = "checkpoints/initial.safetensors"  # round-0 shared weights: Local clients start there
BASE_METADATA = "base"  # INITIAL_WEIGHTS metadata: fingerprint of the base model the run trains
CLIENTS_DIR = "clients"  # clients/<id>/: each client's state (`ClientStore`)
EVALS_DIR = "evals"  # evals/round-<r>/: per-example answers, probe results and document losses (eval/detail.py)
GRAFT_FILE = "personal.safetensors"  # a client's graft and gate (the name existing runs resume with)
STATE_FILE = "state.safetensors"  # a client's `ClientState`
ROUND_MARKER = "ROUND"  # written last into a pending dir: the pending state is complete


class MetricsLog:
    """`metrics.jsonl`: one JSON object per line, each with a "round" key."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, records: list[dict]) -> None:
        """One write per call: a failed one leaves at most a cut last line, which `read` drops
        and a resume removes with the rest of the uncommitted round."""
        text = "".join(json.dumps(record, sort_keys=True) + "\n" for record in records)
        try:
            with self.path.open("a") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as err:
            raise FlexmoeError(f"cannot write {str(self.path)!r}: {err.strerror or err}") from None

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                break
        return records

    def keep_through(self, round_index: int) -> None:
        """Drop the lines of rounds that never committed (after a kill)."""
        kept = [r for r in self.read() if r["round"] <= round_index]
        write_text_atomic(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


def save_server(run_dir: Path, round_index: int, global_weights: Tensors, server_state: Tensors) -> None:
    tensors = {**with_prefix("global.", global_weights), **with_prefix("state.", server_state)}
    save_checked(run_dir / SERVER_CHECKPOINT, tensors, {"round": str(round_index)})


def load_server(run_dir: Path) -> tuple[int, Tensors, Tensors]:
    tensors, metadata = load_checked(run_dir / SERVER_CHECKPOINT)
    return int(metadata["round"]), strip_prefix("global.", tensors), strip_prefix("state.", tensors)


@dataclasses.dataclass
class ClientState:
    """A client's state file (`STATE_FILE`), by part: `method`, what its method keeps between
    rounds (SCAFFOLD's control variate, Local's own weights, FC-MoE's last update, FedAvg-FT's
    fine-tuned weights); `optimizer`, the optimiser's moments; `personal`, its personal parameters
    outside the graft (FedPer's expert LoRA; the graft has `GRAFT_FILE`); `residual`, the uplink's
    rounding error (`wire.error_feedback`). On disk one safetensors file, the engine's parts behind
    the key prefixes of `_PREFIXES` (unchanged, so existing runs resume)."""

    method: Tensors = dataclasses.field(default_factory=dict)
    optimizer: Tensors = dataclasses.field(default_factory=dict)
    personal: Tensors = dataclasses.field(default_factory=dict)
    residual: Tensors = dataclasses.field(default_factory=dict)

    _PREFIXES = {"personal": "personal.", "optimizer": "optim.", "residual": "wire_residual."}

    def tensors(self) -> Tensors:
        """The flat form the file holds."""
        return {**self.method, **{key: value for part in ("personal", "optimizer", "residual")
                                  for key, value in with_prefix(self._PREFIXES[part], getattr(self, part)).items()}}

    @classmethod
    def from_tensors(cls, stored: Tensors) -> ClientState:
        prefixes = tuple(cls._PREFIXES.values())
        return cls(method={k: v for k, v in stored.items() if not k.startswith(prefixes)},
                   **{part: strip_prefix(prefix, stored) for part, prefix in cls._PREFIXES.items()})


JOINED_FILE = "joined.json"  # in a joined client's directory: its data source and its results

class ClientStore:
    """Per-client files under `clients/<id>/`: `state.safetensors` (its `ClientState`),
    `personal.safetensors` (graft and gate, `GRAFT_FILE`), `selection.json`."""

    def __init__(self, root: Path):
        self.root = root

    def dir(self, client_id: int) -> Path:
        return self.root / str(client_id)

    def joined(self, client_id: int) -> dict | None:
        """A client that joined the run later (`engine/join.py`): its data source and results, else None."""
        path = self.dir(client_id) / JOINED_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def write_joined(self, client_id: int, payload: dict) -> None:
        self.dir(client_id).mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.dir(client_id) / JOINED_FILE, json.dumps(payload, indent=1, sort_keys=True) + "\n")

    def pending(self, client_id: int) -> Path:
        return self.dir(client_id) / "pending"

    def latest(self, client_id: int, name: str) -> Path | None:
        """The newest complete copy of a client file (pending first), or None."""
        pending = self.pending(client_id)
        if (pending / ROUND_MARKER).exists() and (pending / name).exists():
            return pending / name
        committed = self.dir(client_id) / name
        return committed if committed.exists() else None

    def load_state(self, client_id: int) -> ClientState:
        path = self.latest(client_id, STATE_FILE)
        return ClientState.from_tensors(load_checked(path)[0] if path else {})

    def save_state(self, client_id: int, state: ClientState) -> None:
        """Into the client's pending directory (`begin`)."""
        save_checked(self.pending(client_id) / STATE_FILE, state.tensors())

    def begin(self, client_id: int) -> Path:
        """A fresh pending directory for this round's new state."""
        pending = self.pending(client_id)
        shutil.rmtree(pending, ignore_errors=True)
        pending.mkdir(parents=True)
        return pending

    def discard(self, client_id: int) -> None:
        """Drop the client's pending state (its round failed): it keeps its last committed state."""
        shutil.rmtree(self.pending(client_id), ignore_errors=True)

    def finish(self, client_id: int, round_index: int) -> None:
        write_text_atomic(self.pending(client_id) / ROUND_MARKER, str(round_index))

    def commit(self, completed_round: int, client_id: int | None = None) -> None:
        """Promote pending states of committed rounds; drop those of uncommitted ones. With
        `client_id`, only that client's (a Flower client may share the root with others)."""
        if not self.root.exists():
            return
        dirs = [self.dir(client_id)] if client_id is not None else sorted(self.root.iterdir())
        for client_dir in dirs:
            pending = client_dir / "pending"
            if not pending.is_dir():
                continue
            marker = pending / ROUND_MARKER
            if marker.exists() and int(marker.read_text()) <= completed_round:
                for item in pending.iterdir():
                    if item.name != ROUND_MARKER:
                        os.replace(item, client_dir / item.name)
            shutil.rmtree(pending)

    def settle(self, client_id: int, committed: int, counted: int, keep_in_progress: bool = False) -> None:
        """Bring one client's files in line with the server: pending state of a committed round
        becomes final only if it is of `counted`, the client's last round the server counted (any
        other committed round's state is of a round counted as failed: its reply was lost or late);
        pending state of a round in progress is kept only when `keep_in_progress`."""
        pending = self.pending(client_id)
        if not pending.is_dir():
            return
        marker = pending / ROUND_MARKER
        round_index = int(marker.read_text()) if marker.exists() else None
        if round_index is not None and round_index > committed and keep_in_progress:
            return
        if round_index is not None and round_index <= committed and round_index == counted:
            self.commit(committed, client_id)
        else:
            self.discard(client_id)

    def save_selection(self, client_id: int, selection: dict) -> None:
        write_text_atomic(self.dir(client_id) / "selection.json", json.dumps(selection, indent=1))


def is_run_dir(path: Path) -> bool:
    """A run directory flexmoe can resume or read: a resolved config and a committed checkpoint."""
    return (path / CONFIG_FILE).is_file() and (path / SERVER_CHECKPOINT).is_file()


"""Rebuild the models a run trained, from its directory alone.

A client's personalised model is the base, plus the shared weights its method evaluates it
with (the global shared part; a Local client's own weights), plus its graft and gate for the
methods that graft. It is built by the engine's own `ClientRunner.load_client_model`, the step the
run's evaluation uses, so `flexmoe eval`, `generate` and `export` see exactly the model the
run evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from flexmoe.config import RunConfig, load_config
from flexmoe.engine.client import ClientRunner
from flexmoe.engine.model import load_model
from flexmoe.errors import FlexmoeError
from flexmoe.files import load_checked
from flexmoe.methods.base import Method
from flexmoe.methods.build import build_method
from flexmoe.tensors import Tensors
from flexmoe.rundir import (
    BASE_METADATA, CLIENTS_DIR, CONFIG_FILE, INITIAL_WEIGHTS, GRAFT_FILE, ClientStore, is_run_dir, load_server,
)


@dataclass
class Checkpoint:
    """What a run directory holds: its config, the last committed round, the server's weights."""

    run_dir: Path
    config: RunConfig
    method: Method
    round: int
    global_weights: Tensors
    store: ClientStore
    server_state: Tensors = field(default_factory=dict)  # e.g. FC-MoE's consensus, for `eval_received`

    def received(self) -> Tensors:
        """What every client holds after the last aggregation (its personalised model's starting point)."""
        return self.method.eval_received(self.global_weights, self.server_state)


@dataclass
class Restored:
    """A rebuilt model (a client's personalised one, or the global one) and where it came from."""

    model: object
    tokenizer: object
    checkpoint: Checkpoint
    runner: ClientRunner  # the engine's client side on this model: `evaluate`, `load_client_model`
    client_id: int | None  # None: the global model


def open_run(run_dir: str | Path, state_dir: str | Path | None = None, device: str | None = None) -> Checkpoint:
    """A run directory's config and last checkpoint; clients' states under `state_dir` when given
    (a deployed client keeps them on its own disk), else under `<run_dir>/clients`. `device`
    replaces the run's `runtime.device` (a run trained on a GPU, evaluated on a laptop)."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise FlexmoeError(f"{run_dir}: not a flexmoe run directory (no {CONFIG_FILE} or server checkpoint)")
    config = load_config(run_dir / CONFIG_FILE, [f"runtime.device={device}"] if device else [])
    round_index, global_weights, server_state = load_server(run_dir)
    return Checkpoint(run_dir, config, build_method(config), round_index, global_weights,
                      ClientStore(Path(state_dir) if state_dir else run_dir / CLIENTS_DIR), server_state)


def check_client(checkpoint: Checkpoint, client_id: int) -> None:
    """A client of the run, or one that joined it later (`engine/join.py`) in this state directory."""
    count = checkpoint.config.num_clients
    joined = client_id >= count and checkpoint.store.joined(client_id) is not None
    if not (0 <= client_id < count or joined):
        raise FlexmoeError(f"{checkpoint.run_dir}: no client {client_id} (the run has clients 0..{count - 1}"
                           f"{'' if client_id < count else f'; none joined as {client_id} in {checkpoint.store.root}'})")
    if checkpoint.method.grafts and checkpoint.store.latest(client_id, GRAFT_FILE) is None:
        raise FlexmoeError(f"{checkpoint.store.dir(client_id)}: client {client_id} has no {GRAFT_FILE}")


def check_base(checkpoint: Checkpoint, model) -> None:
    """Refuse a base model other than the one the run trained on (the model path may hold another)."""
    from flexmoe.models import base_fingerprint

    expected = load_checked(checkpoint.run_dir / INITIAL_WEIGHTS)[1].get(BASE_METADATA)
    found = base_fingerprint(model)
    if expected is not None and expected != found:
        raise FlexmoeError(f"{checkpoint.run_dir}: the run trained on base model {expected}, but "
                           f"model = {checkpoint.config.model!r} now holds a different base model ({found})")


def restore(run_dir: str | Path, client_id: int | None, state_dir: str | Path | None = None,
            device: str | None = None) -> Restored:
    """Client `client_id`'s personalised model from a run directory (None: the global model), on
    the run's `runtime.device` or `device`."""
    checkpoint = open_run(run_dir, state_dir, device)
    if client_id is not None:
        check_client(checkpoint, client_id)
    elif not checkpoint.method.communicates:
        raise FlexmoeError(f"method {checkpoint.method.name!r} trains no global model; choose a client")
    model, tokenizer = load_model(checkpoint.config, checkpoint.method)  # add_lora keeps PEFT's warning quiet
    check_base(checkpoint, model)
    runner = ClientRunner(checkpoint.config, checkpoint.method, model, tokenizer, checkpoint.store,
                          initial_shared=lambda: load_checked(checkpoint.run_dir / INITIAL_WEIGHTS)[0])
    if client_id is None:
        runner.set_shared(checkpoint.global_weights)
    else:
        runner.load_client_model(client_id, checkpoint.received())
    model.eval()
    return Restored(model, tokenizer, checkpoint, runner, client_id)

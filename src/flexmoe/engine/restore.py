"""Rebuild the models a run trained, from its directory alone.

A client's personalised model is the base, plus the shared weights its method evaluates it
with (the global shared part; a Local client's own weights), plus its graft and gate for the
methods that graft. The engine's own evaluation loads clients through `load_client`, so
`flexmoe eval`, `flexmoe generate` and `flexmoe export` see exactly the model the run evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from flexmoe.config import RunConfig, load_config
from flexmoe.engine.rundir import ClientStore, is_run_dir, load_server
from flexmoe.errors import FlexmoeError
from flexmoe.methods import Method, Tensors, build_method

CONFIG_FILE = "config.toml"
INITIAL_WEIGHTS = "checkpoints/initial.safetensors"  # round-0 shared weights, tagged with the base fingerprint
PERSONAL_FILE = "personal.safetensors"
BASE_KEY = "base"  # metadata key of INITIAL_WEIGHTS holding the base model's fingerprint


@dataclass
class Checkpoint:
    """What a run directory holds: its config, the last committed round and global weights."""

    run_dir: Path
    config: RunConfig
    method: Method
    round: int
    global_weights: Tensors
    store: ClientStore
    server_state: Tensors = field(default_factory=dict)  # e.g. FC-MoE's consensus, for `eval_received`


@dataclass
class Restored:
    """A rebuilt model (a client's personalised one, or the global one) and where it came from."""

    model: object
    tokenizer: object
    checkpoint: Checkpoint
    client_id: int | None  # None: the global model


def open_run(run_dir: str | Path) -> Checkpoint:
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise FlexmoeError(f"{run_dir}: not a flexmoe run directory (no {CONFIG_FILE} or server checkpoint)")
    config = load_config(run_dir / CONFIG_FILE)
    round_index, global_weights, server_state = load_server(run_dir)
    return Checkpoint(run_dir, config, build_method(config), round_index, global_weights,
                      ClientStore(run_dir / "clients"), server_state)


def check_client(checkpoint: Checkpoint, client_id: int) -> None:
    count = checkpoint.config.num_clients
    if not 0 <= client_id < count:
        raise FlexmoeError(f"{checkpoint.run_dir}: no client {client_id} (the run has clients 0..{count - 1})")
    if checkpoint.method.grafts and checkpoint.store.latest(client_id, PERSONAL_FILE) is None:
        raise FlexmoeError(f"{checkpoint.store.dir(client_id)}: client {client_id} has no {PERSONAL_FILE}")


def check_base(checkpoint: Checkpoint, model) -> None:
    """Refuse a base model other than the one the run trained on (the model path may have changed)."""
    from safetensors import safe_open

    from flexmoe.models import base_fingerprint

    path = checkpoint.run_dir / INITIAL_WEIGHTS
    if not path.is_file():
        return
    with safe_open(str(path), "pt") as handle:
        expected = (handle.metadata() or {}).get(BASE_KEY)
    found = base_fingerprint(model)
    if expected is not None and expected != found:
        raise FlexmoeError(f"{checkpoint.run_dir}: the run trained on base model {expected}, but "
                           f"model = {checkpoint.config.model!r} now holds base model {found}")


def load_client(model, method: Method, store: ClientStore, global_weights: Tensors, client_id: int) -> None:
    """Make `model` (a base prepared by `method`) client `client_id`'s personalised model, in place."""
    from flexmoe.models import grafts, load_personal, set_shared_state

    client_state = {k: v for k, v in store.load_state(client_id).items() if not k.startswith("optim.")}
    if method.grafts:
        fresh = not grafts(model)
        load_personal(model, store.latest(client_id, PERSONAL_FILE), adopt_selection=True)
        if fresh:  # grafting froze the routers; federated ones belong to the shared part
            _share_routers(model, method)
    set_shared_state(model, method.eval_weights(global_weights, client_state))


def load_global(model, method: Method, global_weights: Tensors) -> None:
    """Make `model` (a fresh base prepared by `method`) the global model: base + global shared part."""
    from flexmoe.models import set_shared_state

    if not method.communicates:
        raise FlexmoeError(f"method {method.name!r} trains no global model; choose a client")
    _share_routers(model, method)
    set_shared_state(model, global_weights)


def _share_routers(model, method: Method) -> None:
    if method.grafts and method.config.flex.federate_routers:
        from flexmoe.models import set_routers_trainable

        set_routers_trainable(model)


def restore(run_dir: str | Path, client_id: int | None, device: str = "cpu") -> Restored:
    """Client `client_id`'s personalised model from a run directory (None: the global model)."""
    from flexmoe.models import load_base

    checkpoint = open_run(run_dir)
    if client_id is not None:
        check_client(checkpoint, client_id)
    model, tokenizer = load_base(checkpoint.config.model, device=device)
    check_base(checkpoint, model)
    model = checkpoint.method.prepare_model(model)
    if client_id is None:
        load_global(model, checkpoint.method, checkpoint.global_weights)
    else:
        received = checkpoint.method.eval_received(checkpoint.global_weights, checkpoint.server_state)
        load_client(model, checkpoint.method, checkpoint.store, received, client_id)
    model.eval()
    return Restored(model, tokenizer, checkpoint, client_id)

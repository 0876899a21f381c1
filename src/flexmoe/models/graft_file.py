"""A client's graft file: its grafted experts and gates, kept on the client's disk.

One safetensors file holds the graft tensors (keys `<layer>.graft.<name>`, independent of any
PEFT wrapper: a full copy's weights, or for a LoRA-mode graft only its LoRA, gate and router rows,
the frozen copy being rebuilt from the base on load) and, as metadata, the fingerprint of the base
model it was grafted onto, the selection, k, the gate kind, how the graft trains and the tensors' checksum (a truncated or corrupted file is refused). Loading into another base, or into a model grafted with another
selection, is refused. In memory, `graft_state` / `set_graft_state` swap clients on one
shared model instance.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from flexmoe.errors import FlexmoeError
from flexmoe.files import load_checked, save_checked, unpack_metadata
from flexmoe.models.families import moe_layers, unwrap
from flexmoe.models.graft import (
    GRAFT,
    GraftTraining,
    current_selection,
    graft,
    grafts,
    rebuild_copy,
    stored_state,
    training_of,
)
from flexmoe.models.roles import copy_checked

FORMAT = "flexmoe-personal/1"
_SAMPLES_PER_TENSOR = 4096


def base_fingerprint(model: nn.Module) -> str:
    """A short hash identifying the base model: architecture plus a strided sample of every
    layer's fused expert weights (frozen in FLEx). Samples are rounded to bfloat16 so the
    same checkpoint loaded in fp32 or bf16 gives the same fingerprint."""
    base = unwrap(model)
    digest = hashlib.sha256()
    config = base.config
    digest.update(f"{config.model_type}|{config.hidden_size}|{config.vocab_size}".encode())
    for layer in moe_layers(model):
        for tensor in (layer.gate_up_proj, layer.down_proj):
            digest.update(f"{layer.name}|{tuple(tensor.shape)}".encode())
            digest.update(_sample_bytes(tensor))
    return digest.hexdigest()[:16]


def _sample_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
    sample = flat[::step][:_SAMPLES_PER_TENSOR].to("cpu", torch.bfloat16)
    return sample.view(torch.int16).numpy().tobytes()


def graft_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every graft tensor a client keeps (weights, gates, expert ids; a LoRA-mode graft's
    LoRA instead of its frozen copy), keyed `<layer>.graft.<name>`."""
    modules = grafts(model)
    if not modules:
        raise FlexmoeError("the model carries no graft: call flexmoe.models.graft first")
    return {f"{layer}.{GRAFT}.{key}": value.detach().clone()
            for layer, module in modules.items() for key, value in stored_state(module).items()}


def set_graft_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a client's graft tensors (from `graft_state`) into the model's grafts, in place, and
    rebuild a LoRA-mode graft's frozen copy from the base's experts the state names."""
    modules = grafts(model)
    if not modules:
        raise FlexmoeError("the model carries no graft: call flexmoe.models.graft first")
    targets = {f"{layer}.{GRAFT}.{key}": value
               for layer, module in modules.items() for key, value in stored_state(module).items()}
    copy_checked(targets, state, "personal state", "this model's grafts")
    for layer in moe_layers(model):
        if layer.name in modules:
            rebuild_copy(modules[layer.name], layer)


def save_graft(model: nn.Module, path: str | os.PathLike) -> pathlib.Path:
    """Write the model's personal state to one safetensors file (atomically)."""
    path = pathlib.Path(path)
    tensors = {key: value.contiguous().cpu() for key, value in graft_state(model).items()}
    module = next(iter(grafts(model).values()))
    metadata = {
        "format": FORMAT,
        "base": base_fingerprint(model),
        "selection": json.dumps(current_selection(model)),
        "k": str(module.k),
        "gate": module.gate_kind,
        **training_of(module).to_metadata(),
    }
    return save_checked(path, tensors, metadata, what="personal state")


def read_graft(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a personal state file, checked to be one and to be intact."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FlexmoeError(f"personal state file {str(path)!r} does not exist")
    try:
        with safe_open(path, framework="pt") as reader:
            metadata = unpack_metadata(reader.metadata())
    except (SafetensorError, OSError) as err:
        raise FlexmoeError(f"{path}: not a readable safetensors file ({err})") from err
    if metadata.get("format") != FORMAT:
        raise FlexmoeError(f"{path}: not a flexmoe personal state file (metadata format "
                           f"{metadata.get('format')!r}, expected {FORMAT!r})")
    return load_checked(path)


def load_graft(model: nn.Module, path: str | os.PathLike, adopt_selection: bool = False) -> nn.Module:
    """Load a client's personal state into `model`, in place.

    An ungrafted model is grafted with the file's selection first. A model grafted with another
    selection is refused unless `adopt_selection` (swapping clients on one shared model).
    A file made on another base model, or with another k, gate or graft training, is always refused.
    """
    tensors, metadata = read_graft(path)
    expected, found = metadata.get("base"), base_fingerprint(model)
    if expected != found:
        raise FlexmoeError(f"{path}: personal state was grafted onto base model {expected}, "
                           f"this model is {found} (a different base model)")
    selection = json.loads(metadata["selection"])
    modules = grafts(model)
    if not modules:
        graft(model, selection, gate=metadata["gate"], training=GraftTraining.from_metadata(metadata))
    else:
        _check_compatible(path, model, modules, metadata, selection, adopt_selection)
    set_graft_state(model, tensors)
    return model


def _check_compatible(path, model, modules, metadata, selection, adopt_selection) -> None:
    module = next(iter(modules.values()))
    if (str(module.k), module.gate_kind) != (metadata["k"], metadata["gate"]):
        raise FlexmoeError(f"{path}: personal state has k={metadata['k']}, gate={metadata['gate']}; the model is "
                           f"grafted with k={module.k}, gate={module.gate_kind}")
    training = GraftTraining.from_metadata(metadata)
    if training != training_of(module):
        raise FlexmoeError(f"{path}: personal state's graft trains as {training}; the model's graft "
                           f"as {training_of(module)}")
    if adopt_selection:
        return
    carried = current_selection(model)
    for layer in moe_layers(model):
        ours, theirs = carried.get(layer.name), selection.get(layer.name)
        if ours != theirs:
            raise FlexmoeError(f"{path}: layer {layer.name} was grafted from experts {theirs}, the model "
                               f"carries experts {ours} (a different selection)")

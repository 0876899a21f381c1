"""FLEx expert grafting: the graft itself.

`graft` adds a copy of the selected experts (`flexmoe.models.selection`) beside the frozen block,
mixed in through an adaptive gate:

    y' = y + sigmoid(w.x + b) * G(x)          (gate="none": y' = y + G(x))

The copy trains in full (train="full"), or stays frozen with PEFT LoRA on its projections
(train="lora", as the FLEx authors' released code most likely does: it loads the copy into
`side_experts.*.base_layer.weight`, PEFT's name for a frozen layer under LoRA); the gate (and, for
k > 1, the graft's router rows) train in both. In LoRA mode the frozen copy is not personal state:
it is rebuilt from the base by `expert_ids` (`rebuild_copy`).

The copy (flexmoe.models.graft_module: plain torch, shipped verbatim in exports) lives in a new
submodule `<block>.graft` and is added by forward hooks, so every
original state-dict key is unchanged and the base weights still load. For a given k every
client's graft has the same structure (only the weights and `expert_ids` differ), so one model
instance can serve many clients by swapping personal tensors (see flexmoe.models.graft_file).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math

import torch
from torch import nn

from flexmoe.methods.flex.config import GATES, GRAFT_INITS, GRAFT_TRAIN_MODES
from flexmoe.errors import FlexmoeError
from flexmoe.models.families import MoELayer, moe_layers, unwrap
from flexmoe.models.graft_module import GRAFT, ExpertGraft, ExpertMLP, attach, detach
from flexmoe.models.peft_quiet import peft_quietly

LORA_ADAPTER = "graft"  # PEFT adapter name of the graft's own LoRA (the shared LoRA is PEFT's "default")
_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
FROZEN_COPY = ".base_layer."  # in a parameter name under the graft: the frozen copy a LoRA-mode graft trains through


def copy_expert(mlp: ExpertMLP, layer: MoELayer, expert: int) -> None:
    """Copy expert `expert` of the layer's fused weights ([gate; up] rows, then down) into `mlp`."""
    with torch.no_grad():
        gate, up = layer.gate_up_proj[expert].chunk(2, dim=0)
        mlp.gate_proj.weight.copy_(gate)
        mlp.up_proj.weight.copy_(up)
        mlp.down_proj.weight.copy_(layer.down_proj[expert])


def extract_expert(layer: MoELayer, expert: int) -> ExpertMLP:
    """A standalone copy of one fused expert, on the layer's device and dtype."""
    mlp = ExpertMLP(layer.hidden_size, layer.intermediate_size, copy.deepcopy(layer.act_fn))
    mlp.to(device=layer.gate_up_proj.device, dtype=layer.gate_up_proj.dtype)
    copy_expert(mlp, layer, expert)
    return mlp


def fused_expert_outputs(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act_fn) -> torch.Tensor:
    """Outputs of c experts on the same tokens at once: x (T, H), gate_up (c, 2I, H), down (c, H, I) -> (c, T, H)."""
    gate, up = torch.matmul(x, gate_up.transpose(1, 2)).chunk(2, dim=-1)
    return torch.matmul(act_fn(gate) * up, down.transpose(1, 2))


def new_graft(layer: MoELayer, k: int, gate: str, training: GraftTraining | None = None) -> ExpertGraft:
    """An (uninitialised) graft of k experts shaped for `layer` and routed as its family routes,
    trained as `training` says (LoRA mode: PEFT LoRA "graft" on each expert's projections)."""
    training = training or FULL
    module = ExpertGraft(layer.hidden_size, layer.intermediate_size, k, gate, layer.hidden_act,
                         score=layer.family.score, output_scale=layer.output_scale,
                         clone_input=layer.family.jitters_in_place)
    module.training_mode = training  # flexmoe's bookkeeping: graft_module knows nothing of LoRA
    if training.mode == "lora":
        _add_lora(module, training)
    return module


@dataclasses.dataclass(frozen=True)
class GraftTraining:
    """How a graft trains: "full" (every weight of the copy) or "lora" (the copy frozen, PEFT LoRA of
    rank `r` on its gate/up/down projections, scale alpha / r, dropout `dropout`)."""

    mode: str = "full"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0

    def __post_init__(self):
        if self.mode not in GRAFT_TRAIN_MODES:
            raise FlexmoeError(f"unknown graft training {self.mode!r}; choose one of {', '.join(GRAFT_TRAIN_MODES)}")
        if self.mode == "lora" and (self.r < 1 or not self.alpha > 0 or not 0 <= self.dropout < 1):
            raise FlexmoeError(f"graft LoRA needs r >= 1, alpha > 0 and 0 <= dropout < 1 "
                               f"(got r={self.r}, alpha={self.alpha}, dropout={self.dropout})")

    def to_metadata(self) -> dict[str, str]:
        if self.mode == "full":
            return {"graft_train": "full"}
        return {"graft_train": "lora", "graft_r": str(self.r), "graft_alpha": repr(float(self.alpha)),
                "graft_dropout": repr(float(self.dropout))}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> GraftTraining:
        """The training a personal file's metadata names (files without it hold a full copy)."""
        if metadata.get("graft_train", "full") == "full":
            return cls()
        return cls("lora", int(metadata["graft_r"]), float(metadata["graft_alpha"]), float(metadata["graft_dropout"]))


FULL = GraftTraining()


def training_of(module: ExpertGraft) -> GraftTraining:
    """How `module` trains (a graft rebuilt from an export, without LoRA, is a full copy)."""
    return getattr(module, "training_mode", FULL)


def _add_lora(module: ExpertGraft, training: GraftTraining) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=training.r, lora_alpha=training.alpha, lora_dropout=training.dropout, bias="none",
                        target_modules=["gate_proj", "up_proj", "down_proj"])
    with peft_quietly():
        inject_adapter_in_model(config, module.experts, adapter_name=LORA_ADAPTER)


def _lora_layers(module: ExpertGraft) -> list[nn.Module]:
    return [mlp.get_submodule(name) for mlp in module.experts for name in _PROJECTIONS]


def set_trainable(module: ExpertGraft) -> None:
    """Everything but a LoRA-mode graft's frozen copy trains."""
    for name, param in module.named_parameters():
        param.requires_grad_(FROZEN_COPY not in f".{name}")


def stored_state(module: ExpertGraft) -> dict[str, torch.Tensor]:
    """What a client keeps of this graft: its whole state, except a LoRA-mode graft's frozen copy
    (rebuilt from the base by `expert_ids`)."""
    return {key: value for key, value in module.state_dict().items() if FROZEN_COPY not in f".{key}"}


@torch.no_grad()
def rebuild_copy(module: ExpertGraft, layer: MoELayer) -> None:
    """A LoRA-mode graft's frozen copy, from the base's experts `expert_ids` (no-op in full mode)."""
    if training_of(module).mode == "lora":
        for mlp, expert in zip(module.experts, module.expert_ids.tolist(), strict=True):
            copy_expert(mlp, layer, expert)


@torch.no_grad()
def fold_graft_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRA-mode graft's LoRA into its copy (PEFT `merge`), leaving plain `ExpertGraft`s
    of full copies: what an export holds, loadable without PEFT. Call it before PEFT's
    `merge_and_unload` of the shared LoRA, which would otherwise fold the graft's LoRA too and
    leave its frozen copy under PEFT's names. In place; a no-op without LoRA-mode grafts."""
    for module in grafts(model).values():
        if training_of(module).mode != "lora":
            continue
        for mlp in module.experts:
            for name in _PROJECTIONS:
                lora = mlp.get_submodule(name)
                lora.merge(safe_merge=True, adapter_names=[LORA_ADAPTER])
                setattr(mlp, name, lora.get_base_layer())
        module.training_mode = FULL
        set_trainable(module)
    return model


@torch.no_grad()
def reset_graft(module: ExpertGraft, layer: MoELayer, experts: list[int], gate_init_bias: float,
                init: str = "copy", seed: int = 0) -> None:
    """Copy the chosen experts (and their router rows) from the base; close the gate to sigmoid(bias).
    init="zero" copies no expert weight: gate/up start as `nn.Linear` initialises them (seeded by
    `seed` and the layer) and down at zero, so the graft's output starts at 0 (as LoRA's B) while
    its gradients do not (with every weight zero, every gradient would be zero too).
    A LoRA-mode graft's LoRA starts as PEFT initialises it (B = 0: the copy's output), seeded alike."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + layer.index)
    if training_of(module).mode == "lora":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1_000_003 + layer.index)
            for lora in _lora_layers(module):
                lora.reset_lora_parameters(LORA_ADAPTER, True)
    for mlp, expert in zip(module.experts, experts, strict=True):
        if init == "zero":
            for linear in (mlp.gate_proj, mlp.up_proj):
                fresh = torch.empty(linear.weight.shape)
                nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)  # nn.Linear's default
                linear.weight.copy_(fresh)
            mlp.down_proj.weight.zero_()
        else:
            copy_expert(mlp, layer, expert)
    if module.router is not None:
        module.router.weight.copy_(layer.router.weight[experts])
    if module.gate is not None:
        module.gate.weight.zero_()
        module.gate.bias.fill_(gate_init_bias)
    module.expert_ids.copy_(torch.tensor(experts, dtype=torch.long))


# -- grafting ---------------------------------------------------------------------------------


def graft(model: nn.Module, selection: dict[str, list[int]], gate: str = "sigmoid",
          gate_init_bias: float = -4.0, init: str = "copy", seed: int = 0,
          training: GraftTraining = FULL) -> nn.Module:
    """Graft copies of the selected experts into every MoE layer, in place (`init`, `seed`: see
    `ExpertGraft.reset`; `training`: the whole copy trains, or LoRA on a frozen copy).

    Freezes every original parameter (LoRA adapters, if present, stay trainable). Grafting a
    model that already carries a graft of the same k, gate and training re-initialises it with the
    new selection (same modules, new weights).
    """
    if gate not in GATES:
        raise FlexmoeError(f"unknown graft gate {gate!r}; choose one of {', '.join(GATES)}")
    if init not in GRAFT_INITS:
        raise FlexmoeError(f"unknown graft init {init!r}; choose one of {', '.join(GRAFT_INITS)}")
    if init == "zero" and training.mode == "lora":
        raise FlexmoeError("graft init 'zero' (fresh weights, no copy) needs the graft trained in full: "
                           "a frozen copy under LoRA is rebuilt from the base's expert")
    if not math.isfinite(gate_init_bias):
        raise FlexmoeError(f"gate_init_bias must be a finite number, got {gate_init_bias}")
    layers = moe_layers(model)
    k = _check_selection(layers, selection)
    for name, param in unwrap(model).named_parameters():
        if "lora_" not in name and GRAFT not in name.split("."):
            param.requires_grad_(False)
    for layer in layers:
        module = getattr(layer.block, GRAFT, None)
        if module is None:
            module = _attach(layer, k, gate, training)
        elif (module.k, module.gate_kind, training_of(module)) != (k, gate, training):
            raise FlexmoeError(f"layer {layer.name} already carries a graft with k={module.k}, "
                               f"gate={module.gate_kind}, training {training_of(module)}; "
                               f"cannot re-graft with k={k}, gate={gate}, training {training} (call ungraft first)")
        reset_graft(module, layer, list(selection[layer.name]), gate_init_bias, init, seed)
        set_trainable(module)
    return model


def _check_selection(layers: list[MoELayer], selection: dict[str, list[int]]) -> int:
    names = [layer.name for layer in layers]
    unknown = [name for name in selection if name not in names]
    if unknown:
        raise FlexmoeError(f"selection names layer {unknown[0]!r}, which is not an MoE layer of this model "
                           f"(its MoE layers: {', '.join(names)})")
    missing = [name for name in names if name not in selection]
    if missing:
        raise FlexmoeError(f"selection has no expert for MoE layer {missing[0]!r}")
    sizes = {len(selection[name]) for name in names}
    if len(sizes) != 1:
        raise FlexmoeError(f"selection grafts different numbers of experts per layer ({sorted(sizes)}); "
                           "every layer must graft the same k")
    for layer in layers:
        experts = [int(e) for e in selection[layer.name]]
        if len(set(experts)) != len(experts) or not all(0 <= e < layer.num_experts for e in experts):
            raise FlexmoeError(f"layer {layer.name}: selected experts {experts} must be distinct ids in "
                               f"[0, {layer.num_experts})")
    k = sizes.pop()
    if k < 1:
        raise FlexmoeError("selection grafts no expert")
    return k


def _attach(layer: MoELayer, k: int, gate: str, training: GraftTraining) -> ExpertGraft:
    # trainable: fp32 master weights whatever the base's dtype (a LoRA-mode frozen copy too: one dtype
    # for the whole branch; keeping that copy at the base's dtype would halve its memory on a bf16 base)
    dtype = torch.float32 if layer.gate_up_proj.dtype in (torch.bfloat16, torch.float16) else layer.gate_up_proj.dtype
    module = new_graft(layer, k, gate, training).to(device=layer.gate_up_proj.device, dtype=dtype)
    return attach(layer.block, module)


def grafts(model: nn.Module) -> dict[str, ExpertGraft]:
    """{layer name: graft module} for every grafted MoE layer, in layer order."""
    return {layer.name: getattr(layer.block, GRAFT) for layer in moe_layers(model)
            if isinstance(getattr(layer.block, GRAFT, None), ExpertGraft)}


def current_selection(model: nn.Module) -> dict[str, list[int]]:
    """The expert ids the model's grafts were copied from ({} when not grafted)."""
    return {name: module.expert_ids.tolist() for name, module in grafts(model).items()}


def ungraft(model: nn.Module) -> nn.Module:
    """Remove every graft and its hooks (the base parameters stay frozen)."""
    for layer in moe_layers(model):
        if isinstance(getattr(layer.block, GRAFT, None), ExpertGraft):
            detach(layer.block)
    return model


@contextlib.contextmanager
def grafts_disabled(model: nn.Module):
    """Run the base model as if it had no graft."""
    modules = list(grafts(model).values())
    previous = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield
    finally:
        for m, was in zip(modules, previous, strict=True):
            m.enabled = was

"""FLEx expert grafting.

`select_experts` picks, per MoE layer, the expert(s) whose output best reconstructs the layer's
routed output on a client's data (or a random / most-routed one, for ablations); `graft` adds
a copy of them beside the frozen block, mixed in through an adaptive gate:

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
instance can serve many clients by swapping personal tensors (see flexmoe.models.personal).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from flexmoe.data.tokens import IGNORE_INDEX
from flexmoe.errors import FlexmoeError
from flexmoe.models.families import MoELayer, moe_layers, unwrap
from flexmoe.models.graft_module import GRAFT, ExpertGraft, ExpertMLP, attach, detach, log_scores

STRATEGIES = ("reconstruction", "random", "frequency")
GATES = ("sigmoid", "none")
TRAIN_MODES = ("full", "lora")
LORA_ADAPTER = "graft"  # PEFT adapter name of the graft's own LoRA (the shared LoRA is PEFT's "default")
_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
FROZEN_COPY = ".base_layer."  # in a parameter name under the graft: the frozen copy a LoRA-mode graft trains through
INITS = ("copy", "zero")  # "zero": an ablation, the selected expert's shape but not its weights (`reset_graft`)
DEFAULT_MAX_TOKENS = 4096
# Expert outputs are computed a chunk of experts at a time so that a chunk's (c, T, 2I)
# activations stay under this many elements (~32 MB in fp32): measured on CPU, 256 MB chunks
# ran ~15% slower than 32 MB ones (cache misses on the large temporaries).
_CHUNK_ELEMENTS = 8 * 1024 * 1024


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
        if self.mode not in TRAIN_MODES:
            raise FlexmoeError(f"unknown graft training {self.mode!r}; choose one of {', '.join(TRAIN_MODES)}")
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

    from flexmoe.models.lora import peft_quietly

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


# -- selection --------------------------------------------------------------------------------


class Selection(dict):
    """{layer name: [expert ids]} in layer order, plus what the choice rests on.

    `losses[layer]`: reconstruction loss of each single expert (mean over tokens of
    ||R - scale * E_e(X)||^2; reconstruction strategy only). `set_losses[layer]`: that loss for
    the chosen set (router restricted to it). `margins[layer]`: loss of the
    runner-up candidate minus the chosen one at the last greedy step. `counts[layer]`: how often
    the router picked each expert (frequency strategy). `tokens[layer]`: tokens used.
    """

    def __init__(self, chosen: dict[str, list[int]], *, strategy: str, k: int,
                 losses=None, set_losses=None, margins=None, counts=None, tokens=None):
        super().__init__(chosen)
        self.strategy = strategy
        self.k = k
        self.losses: dict[str, list[float]] = losses or {}
        self.set_losses: dict[str, float] = set_losses or {}
        self.margins: dict[str, float] = margins or {}
        self.counts: dict[str, list[int]] = counts or {}
        self.tokens: dict[str, int] = tokens or {}

    def to_json(self) -> dict:
        layers = {}
        for name, experts in self.items():
            entry = {"experts": list(experts)}
            for key, table in (("loss", self.set_losses), ("margin", self.margins), ("tokens", self.tokens),
                               ("losses", self.losses), ("counts", self.counts)):
                if name in table:
                    entry[key] = table[name]
            if name in self.losses:  # whether selection matters: the chosen expert against the field
                singles = sorted(self.losses[name])
                entry["median_loss"] = singles[len(singles) // 2] if len(singles) % 2 else \
                    (singles[len(singles) // 2 - 1] + singles[len(singles) // 2]) / 2
                entry["worst_loss"] = singles[-1]
            layers[name] = entry
        return {"strategy": self.strategy, "k": self.k, "layers": layers}


def select_experts(model: nn.Module, batches: Iterable, k: int = 1, strategy: str = "reconstruction",
                   max_tokens: int = DEFAULT_MAX_TOKENS, seed: int = 0) -> Selection:
    """Choose k experts per MoE layer on a client's data (FLEx step 2: grafting by reconstruction).

    batches: input_ids tensors ((B, T) or (T,)) or dicts with "input_ids" and optionally
    "attention_mask" (padding is excluded) and "labels" (then only supervised tokens, labels
    != IGNORE_INDEX, are calibration tokens; the whole sequence still flows through the model).
    Tokens are uniformly subsampled (seeded) to at most `max_tokens` per layer. The base model
    runs in eval mode with any graft disabled.
    """
    layers = moe_layers(model)
    _check_selection_args(layers, k, strategy, max_tokens)
    if strategy == "random":
        return _random_selection(layers, k, seed)
    captures = _capture(model, layers, batches, max_tokens, seed, want_tokens=strategy == "reconstruction")
    if strategy == "frequency":
        counts = {layer.name: captures[layer.name].counts for layer in layers}
        chosen = {name: _most_frequent(c, k) for name, c in counts.items()}
        tokens = {layer.name: int(counts[layer.name].sum()) // layer.top_k for layer in layers}
        return Selection(chosen, strategy=strategy, k=k, counts={n: c.tolist() for n, c in counts.items()},
                         tokens=tokens)
    chosen, losses, set_losses, margins, tokens = {}, {}, {}, {}, {}
    for layer in layers:
        capture = captures[layer.name]
        experts, step_losses = greedy_reconstruction(layer, capture.x, capture.r, k)
        chosen[layer.name] = experts
        losses[layer.name] = step_losses[0].tolist()
        set_losses[layer.name] = float(step_losses[-1][experts[-1]])
        margins[layer.name] = _margin(step_losses[-1], experts[-1])
        tokens[layer.name] = len(capture.x)
    return Selection(chosen, strategy=strategy, k=k, losses=losses, set_losses=set_losses, margins=margins,
                     tokens=tokens)


def _check_selection_args(layers: list[MoELayer], k: int, strategy: str, max_tokens: int) -> None:
    if strategy not in STRATEGIES:
        raise FlexmoeError(f"unknown selection strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    smallest = min(layer.num_experts for layer in layers)
    if not 1 <= k < smallest:
        raise FlexmoeError(f"k={k} grafted experts per layer: must be between 1 and {smallest - 1} "
                           f"(the model has {smallest} experts per layer)")
    if max_tokens < 1:
        raise FlexmoeError(f"max_tokens={max_tokens}: must be at least 1")


def _random_selection(layers: list[MoELayer], k: int, seed: int) -> Selection:
    generator = torch.Generator().manual_seed(seed)
    chosen = {layer.name: torch.randperm(layer.num_experts, generator=generator)[:k].tolist() for layer in layers}
    return Selection(chosen, strategy="random", k=k)


def _most_frequent(counts: torch.Tensor, k: int) -> list[int]:
    # stable sort: ties go to the lower expert id, deterministically
    order = torch.sort(-counts, stable=True).indices
    return order[:k].tolist()


def _margin(losses: torch.Tensor, chosen: int) -> float:
    others = torch.cat([losses[:chosen], losses[chosen + 1 :]])
    others = others[torch.isfinite(others)]
    return float(others.min() - losses[chosen]) if len(others) else math.nan


@torch.no_grad()
def greedy_reconstruction(layer: MoELayer, x: torch.Tensor, r: torch.Tensor, k: int):
    """Greedy best k-subset of experts for reconstructing the routed output r from block input x.

    The block pruned to a subset S routes every token over S only: its output is
    scale * sum_{j in S} softmax_S(log score)_j E_j(x). Step s tries every remaining expert as
    the (s+1)-th member, vectorised over experts on the fused weights.
    Returns (chosen ids, [loss of every candidate (E,) per step; chosen ones are inf]).
    """
    device = layer.gate_up_proj.device
    x, r = x.to(device, torch.float32), r.to(device, torch.float32)
    logs = log_scores(F.linear(x, layer.router.weight.float()), layer.family.score)  # (T, E)
    chosen: list[int] = []
    step_losses = []
    # running sum over chosen experts, normalised to their largest log score per token (stable)
    num = torch.zeros_like(r)
    den = torch.zeros(len(x), 1, device=x.device)
    top = torch.full((len(x), 1), -math.inf, device=x.device)
    gate_up, down = layer.gate_up_proj, layer.down_proj  # once: a quantised base dequantises on every access
    for step in range(k):
        losses = torch.empty(layer.num_experts, device=x.device)
        for start, stop in _expert_chunks(layer, len(x), copies=gate_up.dtype != torch.float32):
            out = fused_expert_outputs(x, gate_up[start:stop].float(), down[start:stop].float(),
                                       layer.act_fn)  # (c, T, H)
            pred = out if not chosen else _mix(num, den, top, logs[:, start:stop].T.unsqueeze(-1), out)
            if layer.output_scale != 1.0:
                pred = layer.output_scale * pred
            losses[start:stop] = ((r - pred) ** 2).sum(-1).mean(-1)
        losses[chosen] = math.inf
        best = int(torch.argmin(losses))
        chosen.append(best)
        step_losses.append(losses.cpu())
        if step + 1 < k:
            num, den, top = _add_member(num, den, top, logs[:, best : best + 1], _single_output(layer, x, best))
    return chosen, step_losses


def _mix(num, den, top, cand_log, cand_out):
    """Output of the chosen set plus one candidate, weights softmax over their log scores."""
    new_top = torch.maximum(top, cand_log)  # (c, T, 1)
    old, new = torch.exp(top - new_top), torch.exp(cand_log - new_top)
    return (old * num + new * cand_out) / (old * den + new)


def _add_member(num, den, top, member_log, member_out):
    new_top = torch.maximum(top, member_log)
    old, new = torch.exp(top - new_top), torch.exp(member_log - new_top)  # old = 0 before the first member
    return old * num + new * member_out, old * den + new, new_top


def _single_output(layer: MoELayer, x: torch.Tensor, expert: int) -> torch.Tensor:
    sl = slice(expert, expert + 1)
    return fused_expert_outputs(x, layer.gate_up_proj[sl].float(), layer.down_proj[sl].float(), layer.act_fn)[0]


def _expert_chunks(layer: MoELayer, tokens: int, copies: bool) -> Iterator[tuple[int, int]]:
    # a chunk's (c, T, 2I) activations and, from a half-precision base, its fp32 copy of the weights
    # (3 I H an expert): without the copy, few tokens put every expert in one chunk and the peak grew
    # with the expert count (benchmarks/results/selection-*.md)
    copied = 3 * layer.intermediate_size * layer.hidden_size if copies else 0
    per_expert = max(1, tokens * max(2 * layer.intermediate_size, layer.hidden_size) + copied)
    size = max(1, _CHUNK_ELEMENTS // per_expert)
    for start in range(0, layer.num_experts, size):
        yield start, min(start + size, layer.num_experts)


# -- capturing block inputs, routed outputs and router choices ---------------------------------


@dataclasses.dataclass
class _LayerCapture:
    """A uniform sample (without replacement) of at most `cap` tokens, kept by smallest random key."""

    cap: int
    generator: torch.Generator
    num_experts: int
    x: torch.Tensor | None = None
    r: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    counts: torch.Tensor | None = None

    def add_tokens(self, x: torch.Tensor, r: torch.Tensor) -> None:
        keys = torch.rand(len(x), generator=self.generator)
        x, r = x.detach().float().cpu(), r.detach().float().cpu()
        if self.x is not None:
            x, r, keys = torch.cat([self.x, x]), torch.cat([self.r, r]), torch.cat([self.keys, keys])
        if len(keys) > self.cap:
            keep = torch.sort(torch.topk(keys, self.cap, largest=False).indices).values
            x, r, keys = x[keep], r[keep], keys[keep]
        self.x, self.r, self.keys = x, r, keys

    def add_choices(self, indices: torch.Tensor) -> None:
        counts = torch.bincount(indices.reshape(-1).cpu(), minlength=self.num_experts)
        self.counts = counts if self.counts is None else self.counts + counts


def _capture(model, layers, batches, max_tokens, seed, want_tokens: bool) -> dict[str, _LayerCapture]:
    captures = {
        layer.name: _LayerCapture(max_tokens, torch.Generator().manual_seed(seed * 1_000_003 + layer.index),
                                  layer.num_experts)
        for layer in layers
    }
    valid: list[torch.Tensor | None] = [None]  # flattened calibration-token mask of the current batch
    handles = []
    for layer in layers:
        capture = captures[layer.name]
        if want_tokens:
            handles.append(layer.block.experts.register_forward_hook(_token_hook(capture, valid), with_kwargs=True))
        else:
            handles.append(layer.block.get_submodule(layer.family.router).register_forward_hook(
                _router_hook(capture, valid, layer.name)))
    device = next(unwrap(model).parameters()).device
    decoder = unwrap(model).get_decoder()  # the LM head's vocabulary-sized logits are not needed here
    seen = 0
    try:
        with torch.no_grad(), _eval_mode(model), grafts_disabled(model):
            for input_ids, attention_mask, calibration in _iter_batches(batches):
                valid[0] = None if calibration is None else calibration.reshape(-1).to(device)
                decoder(input_ids=input_ids.to(device),
                        attention_mask=None if attention_mask is None else attention_mask.to(device), use_cache=False)
                seen += int(input_ids.numel() if calibration is None else calibration.sum())
    finally:
        for handle in handles:
            handle.remove()
    if seen == 0:
        raise FlexmoeError("no tokens to select experts from: the calibration batches are empty")
    return captures


def _token_hook(capture: _LayerCapture, valid):
    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        routed = output[0] if isinstance(output, tuple) else output
        mask = valid[0]
        if mask is not None:
            x, routed = x[mask], routed[mask]
        capture.add_tokens(x, routed)

    return hook


def _router_hook(capture: _LayerCapture, valid, layer_name: str):
    def hook(module, args, output):
        # transformers 5 routers return (logits, weights, indices): the integer tensor is the true
        # choice (deepseek_v3 adds a bias before its top-k, so the top-k of the logits is not)
        chosen = [t for t in output if isinstance(t, torch.Tensor) and not t.is_floating_point()] \
            if isinstance(output, tuple) else []
        if not chosen:
            raise FlexmoeError(f"layer {layer_name}: the router returned no expert indices "
                               "(expected a (logits, weights, indices) tuple)")
        indices = chosen[0].reshape(-1, chosen[0].shape[-1])
        mask = valid[0]
        if mask is not None:
            indices = indices[mask]
        capture.add_choices(indices)

    return hook


def _iter_batches(batches) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
    """(input_ids, attention_mask, calibration mask) per batch. Calibration tokens are the
    non-padding ones, and of those only the supervised ones (labels != IGNORE_INDEX) when the batch
    carries labels: the prompt template is the same for every client and would blur the choice."""
    for position, batch in enumerate(batches):
        batch = dict(batch) if isinstance(batch, dict) else {"input_ids": batch}
        if "input_ids" not in batch:
            raise FlexmoeError(f"calibration batch {position} has no 'input_ids'")
        tensors = {key: torch.as_tensor(batch[key]) for key in ("input_ids", "attention_mask", "labels")
                   if batch.get(key) is not None}
        tensors = {key: t.unsqueeze(0) if t.dim() == 1 else t for key, t in tensors.items()}
        input_ids = tensors["input_ids"]
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise FlexmoeError(f"calibration batch {position}: expected integer token ids of shape (batch, length), "
                               f"got {input_ids.dtype} {tuple(input_ids.shape)}")
        for key in ("attention_mask", "labels"):
            if key in tensors and tensors[key].shape != input_ids.shape:
                raise FlexmoeError(f"calibration batch {position}: {key} has shape {tuple(tensors[key].shape)}, "
                                   f"input_ids {tuple(input_ids.shape)}")
        attention_mask = tensors.get("attention_mask")
        calibration = None if attention_mask is None else attention_mask.bool()
        if "labels" in tensors:
            supervised = tensors["labels"] != IGNORE_INDEX
            calibration = supervised if calibration is None else calibration & supervised
        if input_ids.numel():
            yield input_ids.long(), attention_mask, calibration


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    # routed targets are taken in eval mode: no jitter, no sampled routing (phimoe)
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


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
    if init not in INITS:
        raise FlexmoeError(f"unknown graft init {init!r}; choose one of {', '.join(INITS)}")
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

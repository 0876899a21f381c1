"""`flexmoe plan`: what a run will cost before anything runs.

For a model (a local Hugging Face directory, "tiny", or a shipped shape: the architecture
fields of a public checkpoint's config, `assets/shapes/<name>.json`, no weights) and a run
config, it reports per client per round the bytes up and down, the personal state a client
keeps, the server's state, and the device memory of one client step: frozen weights at the
base dtype, fp32 trainables, their gradients and optimiser state, and the activations of a
batch x length step, with and without gradient checkpointing.

Everything is built on the meta device from the real config (no memory, no weights): the
bytes by the methods' own code (`flexmoe.cost.comm.method_message_sizes`), the step by running
the real forward and backward on meta tensors under `flexmoe.cost.memory.TensorMemory`, which
keeps the peak of the tensor bytes alive at once, exactly as it does on real tensors.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from flexmoe.config import RunConfig
from flexmoe.errors import FlexmoeError
from flexmoe.cost.comm import method_message_sizes, prepare_like_a_client, serialized_size
from flexmoe.methods.base import LocalRun
from flexmoe.models import graft_state, split_parameters
from flexmoe.models.device import QUANTIZE_SKIP, resolve_dtype
from flexmoe.models.families import unwrap
from flexmoe.models.graft import GRAFT
from flexmoe.models.load import _check_family, resolve_model_dir
from flexmoe.shapes import shape_config, shape_names
from flexmoe.train.loop import activation_checkpointing
from flexmoe.cost.memory import TensorMemory, tensor_bytes


def hf_config(name_or_path: str):
    """The transformers config of a shipped shape, "tiny" or a local model directory."""
    from transformers import AutoConfig

    if str(name_or_path) in shape_names():
        return shape_config(str(name_or_path))
    if not Path(str(name_or_path)).expanduser().exists() and str(name_or_path) != "tiny":
        raise FlexmoeError(f"model {name_or_path!r}: neither a model directory nor a known shape "
                           f"({', '.join(shape_names())})")
    path = resolve_model_dir(name_or_path)
    _check_family(path)
    return AutoConfig.from_pretrained(path, local_files_only=True)


def meta_base(config, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


@dataclass(frozen=True)
class StepMemory:
    """Bytes of device memory of one client step (a training step of `batch` x `length` tokens)."""

    weights_frozen: int
    weights_trainable: int  # fp32 master weights
    gradients: int
    optimizer_state: int
    activations: int  # alive at the end of the forward: what the backward needs, and the loss
    step_transient: int  # the most bytes alive at once in forward + backward (activations, gradients, temporaries)
    peak: int  # weights + optimiser state + step_transient


@dataclass(frozen=True)
class Plan:
    model: str
    model_type: str
    method: str
    base_dtype: str
    device_type: str
    batch: int
    length: int
    response_tokens: int
    total_params: int
    quantizable_params: int  # frozen nn.Linear weights runtime.quantize would quantise (fused experts are not)
    quantize: str
    trainable_params: int
    shared_params: int
    bytes_down: int  # server -> one client, round 1
    bytes_down_max: int  # the largest downlink of any round
    bytes_up: int  # one client -> server
    wire: str  # how tensors travel (`[wire]`): the bytes above are of that form
    personal_state_bytes: int  # what a client stores of its personal part (graft file, personal LoRA, fine-tuned weights)
    client_optimizer_bytes: int  # the optimiser state a client keeps between rounds
    server_state_bytes: int  # global shared weights + server optimiser state
    memory: StepMemory
    memory_checkpointed: StepMemory
    load_peak: int  # loading the base: its frozen weights + the one tensor being converted (flexmoe.models.load)
    runtime_bytes: int  # CPU only: the process before any model (Python, torch, transformers), measured now
    peak_bytes: int  # the run's peak: runtime + the larger of the load and a step (train.gradient_checkpointing's)

    def to_json(self) -> dict:
        return asdict(self)


def plan(config: RunConfig, model: str | None = None, batch: int | None = None, length: int | None = None,
         response_tokens: int | None = None, device_type: str | None = None) -> Plan:
    """The plan of `config` on `model` (default `config.model`). `batch`, `length`: one step's
    shape (default the train config's batch and max length); `response_tokens`: the positions
    that predict a response token (default all: the upper bound); `device_type`: "cpu" or
    "cuda" (default: the run's device, auto = this machine's)."""

    name = model or config.model
    batch = batch or config.train.batch_size
    length = length or config.train.max_length
    response_tokens = batch * (length - 1) if response_tokens is None else response_tokens
    device = torch.device(device_type or _device_type(config.runtime.device))
    dtype = resolve_dtype(config.runtime.base_dtype, device)
    hf = hf_config(name)
    sizes = method_message_sizes(config, meta_base(hf, dtype))
    prepared, method = _prepared(config, meta_base(hf, dtype))
    params = list(prepared.parameters())
    trainable = [p for p in params if p.requires_grad]
    personal = _personal_bytes(prepared, method)
    optimizer = _optimizer_bytes(config, trainable)
    server = _server_bytes(method, prepared)
    common = dict(batch=batch, length=length, response_tokens=response_tokens, optimizer=optimizer)
    runtime = process_bytes() if device.type == "cpu" else 0
    memory = step_memory(prepared, checkpointing=False, **common)
    checkpointed = step_memory(prepared, checkpointing=True, **common)
    load = load_peak(meta_base(hf, dtype))
    if config.runtime.quantize == "nf4":
        memory, checkpointed = (with_nf4_experts(prepared, m, checkpointing=c)
                                for m, c in ((memory, False), (checkpointed, True)))
    step = checkpointed if config.train.gradient_checkpointing else memory
    return Plan(
        model=str(name), model_type=hf.model_type, method=config.method, base_dtype=str(dtype).removeprefix("torch."),
        device_type=device.type, batch=batch, length=length, response_tokens=response_tokens,
        total_params=sum(p.numel() for p in params), trainable_params=sum(p.numel() for p in trainable),
        quantizable_params=quantizable_params(prepared), quantize=config.runtime.quantize,
        shared_params=sizes["shared_params"], bytes_down=sizes["down"], bytes_down_max=sizes["down_max"],
        bytes_up=sizes["up"], wire=wire_form(config.wire), personal_state_bytes=personal, client_optimizer_bytes=optimizer,
        server_state_bytes=server,
        memory=memory, memory_checkpointed=checkpointed, load_peak=load, runtime_bytes=runtime,
        peak_bytes=runtime + max(load, step.peak),
    )


def with_nf4_experts(model: torch.nn.Module, memory: StepMemory, checkpointing: bool) -> StepMemory:
    """`memory` of `model` with its fused experts quantised to 4 bits (`flexmoe.models.quantize`):
    they are stored packed, and each layer's forward dequantises them to the base's dtype, a copy
    that autograd keeps for the backward (every MoE layer's without checkpointing, measured on the
    tiny base: tests/models/test_device.py; one layer's at a time with it)."""
    from flexmoe.models.families import moe_layers
    from flexmoe.models.quantize import EXPERT_PARAMS, quantized_bytes

    per_layer = [[getattr(layer.experts, name) for name in EXPERT_PARAMS] for layer in moe_layers(model)]
    dense = [sum(p.numel() * p.element_size() for p in params) for params in per_layer]
    packed = sum(quantized_bytes(p.numel()) for params in per_layer for p in params)
    frozen = memory.weights_frozen - sum(dense) + packed
    transient = memory.step_transient + (max(dense) if checkpointing else sum(dense))
    return replace(memory, weights_frozen=frozen, step_transient=transient,
                   peak=frozen + memory.weights_trainable + memory.optimizer_state + transient)


def wire_form(wire) -> str:
    """"fp32", "bf16", "fp16", "int8" or "int8 + error feedback"."""
    form = "int8" if wire.quantize == "int8" else wire.dtype
    return form + (" + error feedback" if wire.error_feedback and wire.lossy else "")


def load_peak(base: torch.nn.Module) -> int:
    """Bytes alive while the base loads: `flexmoe.models.load` converts one checkpoint tensor at a
    time into its parameter (fused experts built from their per-expert pieces), so the weights
    plus the largest parameter (measured: benchmarks/results/realshape-*.md)."""
    params = list(base.parameters())
    return tensor_bytes(params) + max(p.numel() * p.element_size() for p in params)


def process_bytes() -> int:
    """This process's resident bytes now (Linux /proc; 0 where unavailable): Python, torch and
    transformers imported, as in every flexmoe process before it loads a model."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def quantizable_params(model: torch.nn.Module) -> int:
    """Frozen weights of the plain nn.Linear modules bitsandbytes would quantise (transformers
    replaces nn.Linear only; flexmoe keeps the LM head and qwen2_moe's shared-expert gate)."""
    return sum(module.weight.numel() for name, module in model.named_modules()
               if type(module) is torch.nn.Linear and not module.weight.requires_grad
               and name.rsplit(".", 1)[-1] not in QUANTIZE_SKIP)


def _device_type(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name).type


def _prepared(config: RunConfig, model: torch.nn.Module):
    """The base with the method's trainable parts, as a client trains it (grafted for FLEx)."""
    model, method, _ = prepare_like_a_client(config, model)
    return model, method


def _personal_bytes(model, method) -> int:
    """What a client stores of its personal part (as a run's train records measure it): the graft file
    (a LoRA-mode graft: its LoRA, gate and router rows only), the personal parameters outside a graft
    (FedPer's expert LoRA) and the method's personal state (FedAvg-FT's fine-tuned weights)."""
    split = split_parameters(model, method.roles)
    held = [p for name, p in split.personal.items() if GRAFT not in name.split(".")]
    shared = {name: p.detach() for name, p in split.shared.items()}
    kept = method.personal_part(method.uplink(shared, shared, {}, LocalRun(steps=1, lr=1.0, num_examples=1))[1]) \
        if method.fine_tunes else {}
    size = sum(p.numel() * p.element_size() for p in (*held, *kept.values()))
    return size + (serialized_size(graft_state(model)) if method.grafts else 0)


def _optimizer_bytes(config: RunConfig, trainable: list[torch.Tensor]) -> int:
    """AdamW keeps two fp32 moments and a step count per parameter; SGD (no momentum) none."""
    if config.train.optimizer == "sgd":
        return 0
    return sum(2 * 4 * p.numel() + 4 for p in trainable)


def _server_bytes(method, model) -> int:

    shared = {n: p.detach() for n, p in split_parameters(model, method.roles).shared.items()}
    if not method.communicates:
        return 0
    return serialized_size(shared) + serialized_size(method.init_server_state(shared))


def step_memory(model: torch.nn.Module, batch: int, length: int, response_tokens: int, optimizer: int,
                checkpointing: bool = False) -> StepMemory:
    """Run one training step's forward and backward of `model` (meta or real) and count its bytes."""

    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    device = params[0].device
    frozen_bytes = tensor_bytes(p for p in params if not p.requires_grad)
    trainable_bytes = tensor_bytes(trainable)
    input_ids = torch.zeros(batch, length, dtype=torch.long, device=device)
    # the causal mask a padded batch gets; passed ready-made, as meta tensors cannot say whether it has padding
    attention_mask = torch.ones(batch, 1, length, length, dtype=torch.bool, device=device).tril()
    targets = torch.zeros(response_tokens, dtype=torch.long, device=device)
    was_training = model.training
    model.train()
    with activation_checkpointing(model, checkpointing), _head_first_rows(model, response_tokens), \
            _no_meta_autocast(), TensorMemory() as counter:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
        activations = counter.live
        loss.backward()
        gradients = sum(p.grad.numel() * p.grad.element_size() for p in trainable if p.grad is not None)
        transient = counter.peak
    for p in trainable:
        p.grad = None
    model.train(was_training)
    return StepMemory(weights_frozen=frozen_bytes, weights_trainable=trainable_bytes, gradients=gradients,
                      optimizer_state=optimizer, activations=activations, step_transient=transient,
                      peak=frozen_bytes + trainable_bytes + optimizer + transient)


@contextlib.contextmanager
def _head_first_rows(model, rows: int):
    """The training loss sends only the positions predicting a response token through the LM
    head (`flexmoe.train.loop.response_loss`); on meta tensors a mask cannot pick them, so the
    first `rows` positions stand in: the same shapes, the same bytes."""
    head = unwrap(model).get_output_embeddings()
    handle = head.register_forward_pre_hook(
        lambda module, args: (args[0].reshape(-1, args[0].shape[-1])[:rows], *args[1:]))
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _no_meta_autocast():
    """PEFT's LoRA on fused expert parameters switches autocast off around its weight fold with
    `torch.autocast(W.device.type, enabled=False)`, which torch refuses for the meta device:
    there, for the meta step only, that is a null context (nothing to switch off)."""
    original = torch.autocast

    def autocast(device_type, *args, **kwargs):
        return contextlib.nullcontext() if device_type == "meta" else original(device_type, *args, **kwargs)

    torch.autocast = autocast
    try:
        yield
    finally:
        torch.autocast = original

"""Where a model runs and in which precision.

`runtime.device` and `runtime.base_dtype` resolve here to a torch device and the dtype of the
frozen base. A half-precision base keeps fp32 master weights for what trains (PEFT keeps LoRA
in fp32, the graft is built in fp32, a federated router is cast up here), and the compute runs
under autocast of the model's device type — the nanoGPT idiom: a null context in fp32, autocast
otherwise. The device's peak memory and the time to move a client's state in are measured here.
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

from flexmoe.errors import FlexmoeError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HALF = (torch.bfloat16, torch.float16)
QUANTIZE_SKIP = ("lm_head", "shared_expert_gate")  # modules runtime.quantize leaves unquantised


def resolve_device(name: str = "auto", key: str = "runtime.device") -> torch.device:
    """"auto" = the first CUDA GPU when there is one, else the CPU; a CUDA device asked for on a
    machine without one is a one-line error naming the config `key` that asked for it."""
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise FlexmoeError(f"{key} = {name!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise FlexmoeError(f"{key} = {name!r}: no CUDA device is available on this machine "
                               f"(torch {torch.__version__}, {build}); use {key}=cpu or auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise FlexmoeError(f"{key} = {name!r}: this machine has {count} CUDA device(s), "
                               f"cuda:0..cuda:{count - 1}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise FlexmoeError(f"{key} = {name!r}: flexmoe runs on cpu or cuda devices")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The frozen base's dtype: "auto" = bf16 on a GPU, fp32 on the CPU (the measured CPU default)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def base_dtype(model: nn.Module) -> torch.dtype:
    """The frozen base's dtype, read from its input embeddings."""
    from flexmoe.models.families import unwrap

    return unwrap(model).get_input_embeddings().weight.dtype


def compute_dtype(model: nn.Module, precision: str = "fp32") -> torch.dtype:
    """What the forward computes in: bf16 when asked (`train.precision`), else the base's dtype."""
    if precision == "bf16":
        return torch.bfloat16
    dtype = base_dtype(model)
    return dtype if dtype in HALF else torch.float32


def autocast(model: nn.Module, precision: str = "fp32"):
    """nanoGPT's idiom: a null context in fp32, else autocast of the model's device type."""
    dtype = compute_dtype(model, precision)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(model_device(model).type, dtype=dtype)


def fp32_master(module: nn.Module) -> None:
    """Cast a trainable module of a half-precision base to fp32 and make it take and return the
    dtype around it (its input is cast up, its floating outputs back), so the rest of the base
    is unchanged. Idempotent; a fp32 module is left alone."""
    if getattr(module, "_flexmoe_fp32", False) or not any(p.dtype in HALF for p in module.parameters()):
        return
    module.float()
    module._flexmoe_fp32 = True
    module.register_forward_pre_hook(_inputs_to_fp32, with_kwargs=True)
    module.register_forward_hook(_outputs_to_input_dtype, with_kwargs=True)


def _inputs_to_fp32(module, args, kwargs):
    dtypes = [t.dtype for t in (*args, *kwargs.values()) if torch.is_tensor(t) and t.is_floating_point()]
    module._flexmoe_input_dtype = dtypes[0] if dtypes else None
    return tuple(_up(a) for a in args), {k: _up(v) for k, v in kwargs.items()}


def _up(value):
    return value.float() if torch.is_tensor(value) and value.dtype in HALF else value


def _outputs_to_input_dtype(module, args, kwargs, output):
    dtype = getattr(module, "_flexmoe_input_dtype", None)
    if dtype not in HALF:
        return output
    cast = lambda t: t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t  # noqa: E731
    return tuple(cast(t) for t in output) if isinstance(output, tuple) else cast(output)


# ---- measuring ------------------------------------------------------------------------------
def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    """Peak bytes allocated on a CUDA device since the last reset (None on the CPU, where the
    process's memory is not the model's: see `flexmoe plan` and benchmarks/results/rss-*.md)."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def timed(device: torch.device, into: dict, key: str):
    """Wall seconds of the block, device work included, stored in `into[key]`."""
    synchronize(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        synchronize(device)
        into[key] = time.perf_counter() - start


def placement(runtime) -> dict:
    """`load_base` keyword arguments (device, dtype) of a `RuntimeConfig`."""
    device = resolve_device(runtime.device)
    return {"device": device, "dtype": resolve_dtype(runtime.base_dtype, device), "quantize": runtime.quantize}


def quantization_config(quantize: str, dtype: torch.dtype, device: torch.device | None = None):
    """transformers' BitsAndBytesConfig for `runtime.quantize`'s nn.Linear modules (transformers'
    `replace_with_bnb_linear`: attention, shared experts, dense MLPs); None for "none", and for
    "nf4" on the CPU (nn.Linear stays at `dtype` there). The fused 3D experts are not nn.Linear:
    "nf4" quantises them after loading (`flexmoe.models.quantize`), "int8" leaves them at `dtype`."""
    if quantize == "none":
        return None
    if dtype not in HALF:
        raise FlexmoeError(f"runtime.quantize = {quantize!r} computes in half precision: "
                           "set runtime.base_dtype to bf16 or fp16")
    if quantize == "nf4" and device is not None and device.type == "cpu":
        # the experts are quantised after loading (flexmoe.models.quantize); nn.Linear stays at `dtype`:
        # measured with bitsandbytes 0.50.2, its CPU Linear4bit fails a FLEx client round ("a view of a
        # leaf Variable that requires grad is being used in an in-place operation") and refuses layers
        # whose width is not a multiple of its block; on CUDA, nn.Linear takes QLoRA's config below
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise FlexmoeError(f"runtime.quantize = {quantize!r} needs bitsandbytes: pip install 'flexmoe[quant]'") from None
    from transformers import BitsAndBytesConfig

    # the LM head (transformers' own default) and qwen2_moe's (hidden -> 1) shared-expert gate stay
    # unquantised: a one-column layer saves nothing and bitsandbytes' CPU 4-bit kernel refuses it
    skip = list(QUANTIZE_SKIP)
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              llm_int8_skip_modules=skip)


# timings and peaks vary from run to run: engines compare metrics without these keys
MEASURED_KEYS = ("swap_seconds", "peak_memory_bytes")


def device_measures(device: torch.device, record: dict) -> dict:
    """A client round's device measures for its train record, on a GPU: the time to move the
    client's state onto it (`record`, from `timed`) and the peak memory allocated in the round.
    None on the CPU, whose metrics stay bitwise reproducible (timings never are); there the
    swap is measured by `flexmoe bench gpu --cpu-smoke`."""
    peak = peak_memory(device)
    if peak is None:
        return {}
    return {"swap_seconds": round(record.get("swap_seconds", 0.0), 6), "peak_memory_bytes": peak}

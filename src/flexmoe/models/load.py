"""Load a base MoE model and its tokenizer from a local directory (never from a hub)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib

import torch

from flexmoe.errors import FlexmoeError
from flexmoe.models.device import quantization_config, resolve_device, resolve_dtype
from flexmoe.models.families import FAMILIES, moe_layers
from flexmoe.models.quantize import quantize_experts

TINY = "tiny"
log = logging.getLogger("flexmoe.models")


def tiny_path() -> pathlib.Path:
    """The shipped tiny pretrained MoE (`src/flexmoe/assets/tiny`)."""
    return pathlib.Path(__file__).resolve().parent.parent / "assets" / "tiny"


def resolve_model_dir(name_or_path: str | pathlib.Path) -> pathlib.Path:
    """The directory behind a model name: "tiny" is the shipped model, anything else a local path."""
    if str(name_or_path) == TINY:
        path = tiny_path()
        if not (path / "config.json").is_file():
            raise FlexmoeError(f"the shipped tiny model is missing: {path} has no config.json "
                               "(build it with `flexmoe pretrain`)")
        return path
    path = pathlib.Path(name_or_path).expanduser()
    if not path.exists():
        raise FlexmoeError(f"model directory {str(path)!r} does not exist "
                           "(flexmoe loads local Hugging Face model directories only)")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise FlexmoeError(f"{str(path)!r} is not a Hugging Face model directory (no config.json)")
    return path


def load_base(name_or_path: str | pathlib.Path = TINY, dtype: torch.dtype | None = None,
              device: str | torch.device = "auto", quantize: str = "none"):
    """Load a local MoE checkpoint and its tokenizer -> (model, tokenizer), model in eval mode.
    `device` as `runtime.device` ("auto": a GPU when there is one); `dtype` default: bf16 on a
    GPU, fp32 on the CPU.
    `quantize` ("nf4", "int8"): the frozen base quantised by bitsandbytes (`runtime.quantize`).

    A dense model, an unsupported family or a directory without weights or tokenizer is refused
    with a FlexmoeError naming the directory.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_dir(name_or_path)
    _check_family(path)
    device = _check_device(device)
    log.info("loading the base model %s", name_or_path if str(name_or_path) == TINY else path)
    dtype = dtype or resolve_dtype("auto", device)
    try:
        with _quiet_progress():
            # a GPU model loads straight onto the GPU: no full copy in host memory first
            quantized = quantization_config(quantize, dtype, device)
            if device.type == "cpu" and not quantized and _safetensors_files(path):
                model = _load_streamed(path, dtype)
            else:
                placed = {"device_map": device} if device.type == "cuda" or quantized else {}
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, **placed,
                                                             **({"quantization_config": quantized} if quantized else {}))
    except (OSError, ValueError) as err:
        raise FlexmoeError(f"cannot load model weights from {str(path)!r}: {_first_line(err)}") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise FlexmoeError(f"cannot load the tokenizer from {str(path)!r}: {_first_line(err)}") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad id; padded labels are -100 anyway
    moe_layers(model)  # refuses a layout we cannot graft
    _check_vocabulary(path, model, tokenizer)
    if not quantized:  # a bitsandbytes model is placed by device_map and refuses .to()
        model = model.to(device)
    if quantize == "nf4":
        log.info("runtime.quantize = nf4: %s fused expert parameters quantised", f"{quantize_experts(moe_layers(model)):,}")
    return model.eval(), tokenizer


def _safetensors_files(path: pathlib.Path) -> list[pathlib.Path]:
    return sorted(path.glob("*.safetensors"))


def _load_streamed(path: pathlib.Path, dtype: torch.dtype):
    """`from_pretrained` on the CPU with no second copy of the base alive: transformers' own key
    conversion (per-expert checkpoint keys fused into the 3D experts) and cast to `dtype`, fed lazy
    safetensors slices read with `pread` one tensor at a time (its default memory-maps the files,
    and every checkpoint page it reads stays resident while any weight shares the mapping) and
    with its loading thread pool off (`HF_DEACTIVATE_ASYNC_LOAD`: the pool reads ahead of the
    conversion, and with a cast every tensor it has read is alive twice). What remains is one
    tensor's conversion at a time, which `flexmoe plan` counts (its `load_peak`); measured on a
    2-layer Qwen1.5-MoE-A2.7B-width bf16 checkpoint loaded as fp32: peak RSS 9.28 -> 5.89 GiB
    for 4.34 GiB of weights (benchmarks/results/realshape-*.md)."""
    from safetensors import safe_open
    from transformers import AutoConfig, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    with contextlib.ExitStack() as files, _sequential_loading():
        state = {}
        for file in _safetensors_files(path):
            reader = files.enter_context(safe_open(file, framework="pt", device="cpu", backend="pread"))
            state.update((key, reader.get_slice(key)) for key in reader.keys())
        model = model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    return model


@contextlib.contextmanager
def _sequential_loading():
    previous = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD")
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = previous


def _check_vocabulary(path: pathlib.Path, model, tokenizer) -> None:
    """A tokenizer with ids the model has no embedding for is not this model's tokenizer (a
    smaller one is fine: embedding tables are often padded)."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise FlexmoeError(f"{str(path)!r}: the tokenizer has {len(tokenizer)} tokens but the model embeds only "
                           f"{rows}: tokenizer and model do not match")


def _check_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return resolve_device("auto")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise FlexmoeError(f"unknown device {str(device)!r} ({_first_line(err)})") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FlexmoeError(f"device {str(device)!r} requested but no CUDA device is available")
    return device


@contextlib.contextmanager
def _quiet_progress():
    # a per-tensor loading bar on stderr would garble one-line CLI errors and JSON pipelines
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def _check_family(path: pathlib.Path) -> None:
    config_file = path / "config.json"
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as err:
        raise FlexmoeError(f"{config_file}: unreadable config ({_first_line(err)})") from err
    if model_type not in FAMILIES:
        raise FlexmoeError(
            f"{str(path)!r} holds a model_type {model_type!r} model, not a supported Mixture-of-Experts "
            f"family ({', '.join(sorted(FAMILIES))})"
        )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__

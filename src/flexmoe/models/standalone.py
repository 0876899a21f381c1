"""A grafted model as a self-contained Hugging Face model directory, loadable with plain transformers.

    config.json          the family's config, with model_type "flexmoe_<family>", the grafts' spec
                         (`flexmoe_grafts`: class and constructor arguments per MoE layer) and an
                         `auto_map` naming the two classes below
    model.safetensors    the base weights (in the dtype asked for) and every graft tensor (fp32), under
                         the modules' names in memory (fused experts: no checkpoint conversion)
    modeling_flexmoe.py  generated: the family's config and CausalLM classes, subclassed to attach
                         the grafts in `__init__`
    flexmoe_graft.py     a verbatim copy of flexmoe.models.graft_module: the code training ran

`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` loads it as the personalised
model. Without trust_remote_code the unknown model_type stops transformers with an error, and
the architecture name is one no serving stack re-implements natively: nothing can silently load
the base without its graft. `load_grafted` is flexmoe's own path to the same model (the family's
class from transformers with flexmoe's graft module), never executing the exported code.
"""

from __future__ import annotations

import contextlib
import functools
import json
import pathlib

import torch
from torch import nn

from flexmoe.errors import FlexmoeError
from flexmoe.models import graft_module
from flexmoe.models.families import FAMILIES, family_of, unwrap
from flexmoe.models.graft import GRAFT, fold_graft_lora, grafts

MODELING_FILE, GRAFT_FILE = "modeling_flexmoe.py", "flexmoe_graft.py"
SPEC_KEY = "flexmoe_grafts"
TYPE_PREFIX = "flexmoe_"

_MODELING = '''"""{family} personalised by flexmoe (FLEx expert grafting): the family's transformers model plus,
in every MoE layer, a grafted expert copy mixed in through its gate. The graft is flexmoe_graft.py,
the code the model was trained with. Load with:

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
"""

from {config_module} import {config_class}
from {model_module} import {model_class}

from .flexmoe_graft import FP32_PATTERNS, attach_from_spec


class {prefix}Config({config_class}):
    model_type = "{model_type}"
    {spec_key}: dict | None = None  # {{"class": graft class, "layers": {{MoE block name: constructor args}}}}


class {prefix}ForCausalLM({model_class}):
    config_class = {prefix}Config
    # the graft keeps fp32 weights on a half-precision base, as in training
    _keep_in_fp32_modules_strict = [*({model_class}._keep_in_fp32_modules_strict or []), *FP32_PATTERNS]

    def __init__(self, config):
        super().__init__(config)
        attach_from_spec(self, config.{spec_key})
'''


def _class_prefix(model_type: str) -> str:
    return "Flexmoe" + "".join(part.capitalize() for part in model_type.split("_"))


def graft_spec(model: nn.Module) -> dict:
    """{"class", "layers": {block name: constructor args}} of the model's grafts: enough, with the
    state dict, to rebuild them."""
    modules = grafts(model)
    classes = {type(module).__name__ for module in modules.values()}
    if not modules or len(classes) != 1:
        raise FlexmoeError("the model carries no graft (or grafts of several classes) to export")
    return {"class": classes.pop(), "layers": {name: module.init_args for name, module in modules.items()}}


def save_grafted(model: nn.Module, tokenizer, directory: pathlib.Path, dtype: torch.dtype) -> None:
    """Write a grafted model (no PEFT wrapper: merge the LoRA first, after `fold_graft_lora`) as a
    standalone directory; the base weights in `dtype`, the graft tensors in fp32. LoRA-mode grafts
    are folded into their copies, in place."""
    if unwrap(model) is not model:
        raise FlexmoeError("save_grafted needs a plain transformers model (merge or unload the LoRA first)")
    family = family_of(model)
    fold_graft_lora(model)  # a LoRA-mode graft is exported as the full copy it amounts to: no PEFT to load it
    spec = graft_spec(model)
    for name, param in model.named_parameters():
        if GRAFT not in name.split("."):
            param.data = param.data.to(dtype)
    for module in grafts(model).values():
        module.to(torch.float32)  # a no-op for fp32 masters; widens a graft trained on a bf16-only base
    # under the names the modules have in memory: a family's checkpoint conversions (renamings, per-expert
    # splits) would apply to the graft's keys too, and custom code is loaded without them anyway
    model.save_pretrained(directory, save_original_format=False)
    tokenizer.save_pretrained(directory)
    _write_code(directory, model, family.model_type)
    _rewrite_config(directory / "config.json", family.model_type, spec)


def _write_code(directory: pathlib.Path, model: nn.Module, model_type: str) -> None:
    config_cls, model_cls = type(model.config), type(model)
    (directory / MODELING_FILE).write_text(_MODELING.format(
        family=model_type, prefix=_class_prefix(model_type), model_type=TYPE_PREFIX + model_type,
        spec_key=SPEC_KEY, config_module=config_cls.__module__, config_class=config_cls.__name__,
        model_module=model_cls.__module__, model_class=model_cls.__name__))
    (directory / GRAFT_FILE).write_text(pathlib.Path(graft_module.__file__).read_text())


def _rewrite_config(path: pathlib.Path, model_type: str, spec: dict) -> None:
    config = json.loads(path.read_text())
    prefix, module = _class_prefix(model_type), MODELING_FILE.removesuffix(".py")
    config.update({
        "model_type": TYPE_PREFIX + model_type,
        "architectures": [f"{prefix}ForCausalLM"],
        "auto_map": {"AutoConfig": f"{module}.{prefix}Config",
                     "AutoModelForCausalLM": f"{module}.{prefix}ForCausalLM"},
        SPEC_KEY: spec,
    })
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_grafted(directory: pathlib.Path, dtype: torch.dtype | None, device: torch.device):
    """flexmoe's own load of a standalone grafted directory -> (model, tokenizer), without executing
    the exported code: the family's transformers class, with the grafts of the saved spec attached
    before the weights load (a class outside transformers: no checkpoint conversion, as on save)."""
    from transformers import AutoConfig, AutoTokenizer

    config_dict = json.loads((directory / "config.json").read_text())
    model_type = str(config_dict.get("model_type")).removeprefix(TYPE_PREFIX)
    if model_type not in FAMILIES or SPEC_KEY not in config_dict:
        raise FlexmoeError(f"{directory}/config.json: not a grafted flexmoe model (model_type "
                           f"{config_dict.get('model_type')!r}, {SPEC_KEY} {'present' if SPEC_KEY in config_dict else 'missing'})")
    config = AutoConfig.for_model(model_type, **{k: v for k, v in config_dict.items()
                                                 if k not in ("model_type", "auto_map", "architectures")})
    family_class = _family_class(config)
    with _quiet_load_report():  # problems are raised below, in one line
        model, info = _grafted_class(family_class).from_pretrained(
            directory, config=config, dtype=dtype, local_files_only=True, output_loading_info=True)
    problems = {kind: sorted(info[kind]) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[kind]}
    if problems:
        raise FlexmoeError(f"{directory}: the weights do not fit its config.json: "
                           + "; ".join(f"{kind.replace('_', ' ')} {keys[:3]}" for kind, keys in problems.items()))
    # with the family's config: AutoTokenizer would otherwise read config.json and ask about its custom code
    tokenizer = AutoTokenizer.from_pretrained(directory, config=config, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # as load_base: batching needs a pad id
    return model.to(device).eval(), tokenizer


def _family_class(config):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping[type(config)]


@functools.cache
def _grafted_class(family_class: type) -> type:
    """The family's class, attaching the grafts its config's spec describes in `__init__` (what the
    exported modeling file does, here with flexmoe's own graft module)."""

    def __init__(self, config):
        family_class.__init__(self, config)
        graft_module.attach_from_spec(self, getattr(config, SPEC_KEY))

    def save_pretrained(self, *args, **kwargs):
        # the family's save would write a plain-looking checkpoint that loads as the base, silently
        raise FlexmoeError("a grafted model saves with flexmoe.models.standalone.save_grafted (or flexmoe export), "
                           "not save_pretrained")

    keep = [*(family_class._keep_in_fp32_modules_strict or []), *graft_module.FP32_PATTERNS]
    return type(family_class.__name__, (family_class,), {
        "__init__": __init__, "save_pretrained": save_pretrained, "_keep_in_fp32_modules_strict": keep,
        "__module__": __name__})


@contextlib.contextmanager
def _quiet_load_report():
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)

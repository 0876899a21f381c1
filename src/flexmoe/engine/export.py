"""Export one client's personalised model as a directory that is itself a Hugging Face model, and load it back.

What the directory holds depends on the method (`flexmoe-export.json`, the manifest, names the layout):

- "grafted" (FLEx and the methods that graft): a standalone model with custom code
  (flexmoe.models.standalone): `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`
  loads base + merged shared LoRA + graft and gate; without trust_remote_code transformers
  refuses it (nothing can load the base silently without its graft). The LoRA is always merged:
  a model with custom code cannot also be a PEFT adapter.
- "merged" (no graft; `merge`, or nothing to merge, e.g. scope "full"): a plain checkpoint of the
  base's family, `AutoModelForCausalLM.from_pretrained(DIR)`.
- "adapter" (no graft, LoRA not merged): DIR is a PEFT adapter directory (`adapter_config.json`),
  and the weights it goes on are in DIR/base-without-adapter (named so that nobody takes them for
  the personalised model): `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
  DIR/base-without-adapter), DIR)`.

The tokenizer is saved at the top of every layout. Weights are written in the base checkpoint's
dtype (a graft's tensors stay fp32, as trained), or in `dtype` when given.
`load_personalized(DIR)` rebuilds the same model with flexmoe's own code.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from flexmoe.errors import FlexmoeError

log = logging.getLogger("flexmoe.engine")
MANIFEST = "flexmoe-export.json"
FORMAT = "flexmoe-export/2"
BASE_DIR = "base-without-adapter"
LAYOUTS = ("grafted", "merged", "adapter")
DTYPES = ("float32", "bfloat16", "float16")


def export_client(run_dir: str | Path, client_id: int, out: str | Path, merge: bool = False,
                  state_dir: str | Path | None = None, dtype: str | None = None,
                  device: str | None = None) -> Path:
    """Write client `client_id`'s personalised model to `out` (which must not exist yet); `merge`
    folds the LoRA of a method without graft into the weights; `dtype` (one of DTYPES) forces the
    weights' dtype, default: the base checkpoint's."""
    if dtype is not None and dtype not in DTYPES:
        raise FlexmoeError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    from flexmoe.engine.restore import restore
    from flexmoe.models.load import _quiet_progress  # no per-shard progress bar on stderr

    out = Path(out)
    if out.exists():
        raise FlexmoeError(f"{out} already exists; export writes a new directory")
    restored = restore(run_dir, client_id, state_dir, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        log.info("writing client %d's model to %s", client_id, out)
        with _quiet_progress():
            manifest = _write_parts(restored, tmp, out, merge, dtype)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _usual_permissions(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_parts(restored, directory: Path, final: Path, merge: bool, dtype: str | None) -> dict:
    from flexmoe.models import base_fingerprint, grafts
    from flexmoe.models.graft import fold_graft_lora
    from flexmoe.models.peft_quiet import peft_quietly
    from flexmoe.models.standalone import save_grafted

    model, checkpoint, tokenizer = restored.model, restored.checkpoint, restored.tokenizer
    target = _target_dtype(checkpoint.config.model, dtype)
    fingerprint = base_fingerprint(model)
    adapter = hasattr(model, "peft_config")
    grafted = bool(grafts(model))
    if grafted:
        layout = "grafted"
        # first: the shared LoRA's merge_and_unload would fold a LoRA-mode graft's own LoRA too,
        # leaving its frozen copy under PEFT's names; folded here, the graft is a plain full copy
        fold_graft_lora(model)
        with peft_quietly():
            save_grafted(model.merge_and_unload() if adapter else model, tokenizer, directory, target)
    elif adapter and not merge:
        layout = "adapter"
        with peft_quietly():
            model.save_pretrained(directory)
        _point_adapter_at(directory, final / BASE_DIR)
        _save_plain(model.unload(), tokenizer, directory / BASE_DIR, target)
        tokenizer.save_pretrained(directory)
    else:
        layout = "merged"
        with peft_quietly():
            _save_plain(model.merge_and_unload() if adapter else model, tokenizer, directory, target)
    return {
        "format": FORMAT,
        "layout": layout,
        "run": str(checkpoint.run_dir.resolve()),
        "client": restored.client_id,
        "method": checkpoint.config.method,
        "round": checkpoint.round,
        "base": fingerprint,
        "template": checkpoint.config.data.template,
        "merged": adapter and layout != "adapter",
        "dtype": str(target).removeprefix("torch."),
    }


def _save_plain(model, tokenizer, directory: Path, dtype) -> None:
    model.to(dtype).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _point_adapter_at(directory: Path, base: Path) -> None:
    """adapter_config.json names the base it goes on: the export's own base-without-adapter
    (where the export is written; `PeftModel.from_pretrained(base, DIR)` works wherever it moves)."""
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = str(base.resolve())
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _target_dtype(base: str, requested: str | None):
    """`requested`, else the base checkpoint's stored dtype (fp32 when it names none)."""
    import torch

    from flexmoe.models.load import resolve_model_dir

    if requested is not None:
        return getattr(torch, requested)
    config = json.loads((resolve_model_dir(base) / "config.json").read_text())
    stored = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float32"), None)
    return stored if isinstance(stored, torch.dtype) and stored.is_floating_point else torch.float32


def _usual_permissions(directory: Path) -> None:
    """Temporary files are private (0600/0700); an export is meant to be shared like any model dir."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [directory, *directory.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise FlexmoeError(f"{path}: not an exported flexmoe model (no {MANIFEST}; create one with flexmoe export)")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise FlexmoeError(f"{file}: invalid JSON at line {err.lineno}") from None
    if manifest.get("format") != FORMAT:
        raise FlexmoeError(f"{file}: format {manifest.get('format')!r}, expected {FORMAT!r} "
                           "(export the run again with this version of flexmoe)")
    if manifest.get("layout") not in LAYOUTS:
        raise FlexmoeError(f"{file}: layout {manifest.get('layout')!r}, expected one of {', '.join(LAYOUTS)}")
    return manifest


def load_personalized(path: str | Path, dtype=None, device: str = "auto"):
    """Load a directory written by `flexmoe export` -> (model, tokenizer), model in eval mode, with
    flexmoe's own code (never the exported modeling file); `device` as `runtime.device` (auto: a
    GPU when there is one), `dtype` of the base (default: bf16 on a GPU, fp32 on the CPU; a graft
    and a LoRA stay fp32)."""
    from flexmoe.models import load_base
    from flexmoe.models.device import resolve_device, resolve_dtype
    from flexmoe.models.standalone import load_grafted

    path = Path(path)
    manifest = read_manifest(path)
    device = resolve_device(str(device))
    dtype = dtype or resolve_dtype("auto", device)
    if manifest["layout"] == "grafted":
        model, tokenizer = load_grafted(path, dtype, device)
    elif manifest["layout"] == "merged":
        model, tokenizer = load_base(path, dtype=dtype, device=device)
    else:
        from peft import PeftModel

        from flexmoe.models.peft_quiet import peft_quietly

        model, tokenizer = load_base(path / BASE_DIR, dtype=dtype, device=device)
        with peft_quietly():
            model = PeftModel.from_pretrained(model, path)
    return model.eval(), tokenizer

"""Export one client's personalised model as a self-contained directory, and load it back.

Layout of an exported directory:

    flexmoe-export.json    manifest: format, run, client, method, round, base fingerprint, parts
    model/                 a Hugging Face model directory (weights + tokenizer): the base with any
                           trained non-LoRA shared weights (federated routers, "full" scope), and
                           the LoRA folded in when exported with merge
    adapter/               the shared LoRA in standard PEFT format (absent when merged or no LoRA)
    personal.safetensors   the graft and gate (methods that graft)

`load_personalized(DIR)` rebuilds exactly the model the run evaluated for that client.

`model/` keeps the base checkpoint's dtype (a bf16 base stays bf16, not twice its size in fp32)
whenever that is lossless, i.e. every weight written is exactly representable in it; weights
trained in fp32 (a merge, federated routers, "full" scope) keep fp32 unless `dtype` is given.
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
FORMAT = "flexmoe-export/1"
MODEL_DIR, ADAPTER_DIR, PERSONAL_FILE = "model", "adapter", "personal.safetensors"
DTYPES = ("float32", "bfloat16", "float16")


def export_client(run_dir: str | Path, client_id: int, out: str | Path, merge: bool = False,
                  state_dir: str | Path | None = None, dtype: str | None = None,
                  device: str | None = None) -> Path:
    """Write client `client_id`'s personalised model to `out` (which must not exist yet);
    `dtype` (one of DTYPES) forces the dtype of `model/`, default: the base's when lossless."""
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
            manifest = _write_parts(restored, tmp, merge, dtype)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _usual_permissions(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_parts(restored, directory: Path, merge: bool, dtype: str | None) -> dict:
    from flexmoe.models import base_fingerprint, grafts, save_personal, ungraft

    model, checkpoint = restored.model, restored.checkpoint
    personal = bool(grafts(model))
    if personal:
        save_personal(model, directory / PERSONAL_FILE)
        ungraft(model)  # the graft travels in its own file, not among the base weights
    adapter = hasattr(model, "peft_config")
    if adapter and merge:
        model = model.merge_and_unload()
    elif adapter:
        model.save_pretrained(directory / ADAPTER_DIR)
        model = model.unload()
    target = _model_dtype(model, checkpoint.config.model, dtype)
    model.to(target)
    model.save_pretrained(directory / MODEL_DIR)
    restored.tokenizer.save_pretrained(directory / MODEL_DIR)
    return {
        "format": FORMAT,
        "run": str(checkpoint.run_dir.resolve()),
        "client": restored.client_id,
        "method": checkpoint.config.method,
        "round": checkpoint.round,
        "base": base_fingerprint(model),
        "template": checkpoint.config.data.template,
        "merged": adapter and merge,
        "adapter": ADAPTER_DIR if adapter and not merge else None,
        "personal": PERSONAL_FILE if personal else None,
        "dtype": str(target).removeprefix("torch."),
    }


def _model_dtype(model, base: str, requested: str | None):
    """`requested`, else the base checkpoint's dtype when every floating weight fits it exactly, else fp32."""
    import torch

    from flexmoe.models.load import resolve_model_dir

    if requested is not None:
        return getattr(torch, requested)
    config = json.loads((resolve_model_dir(base) / "config.json").read_text())
    stored = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float32"), torch.float32)
    if not isinstance(stored, torch.dtype) or not stored.is_floating_point:
        return torch.float32
    exact = all(torch.equal(t, t.to(stored).to(t.dtype)) for t in model.state_dict().values() if t.is_floating_point())
    return stored if exact else torch.float32


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
        raise FlexmoeError(f"{file}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def load_personalized(path: str | Path, dtype=None, device: str = "auto"):
    """Load a directory written by `flexmoe export` -> (model, tokenizer), model in eval mode;
    `device` as `runtime.device` (auto: a GPU when there is one), `dtype` of the base (default:
    bf16 on a GPU, fp32 on the CPU; the graft and LoRA stay fp32)."""
    from flexmoe.models import load_base, load_personal
    from flexmoe.models.device import resolve_device, resolve_dtype

    path = Path(path)
    manifest = read_manifest(path)
    device = resolve_device(str(device))
    model, tokenizer = load_base(path / MODEL_DIR, dtype=dtype or resolve_dtype("auto", device), device=device)
    if manifest["adapter"]:
        from peft import PeftModel

        from flexmoe.models.lora import peft_quietly

        with peft_quietly():
            model = PeftModel.from_pretrained(model, path / manifest["adapter"])
    if manifest["personal"]:
        load_personal(model, path / manifest["personal"])
    return model.eval(), tokenizer

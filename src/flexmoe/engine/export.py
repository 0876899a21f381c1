"""Export one client's personalised model as a self-contained directory, and load it back.

Layout of an exported directory:

    flexmoe-export.json    manifest: format, run, client, method, round, base fingerprint, parts
    model/                 a Hugging Face model directory (weights + tokenizer): the base with any
                           trained non-LoRA shared weights (federated routers, "full" scope), and
                           the LoRA folded in when exported with merge
    adapter/               the shared LoRA in standard PEFT format (absent when merged or no LoRA)
    personal.safetensors   the graft and gate (methods that graft)

`load_personalized(DIR)` rebuilds exactly the model the run evaluated for that client.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from flexmoe.errors import FlexmoeError

MANIFEST = "flexmoe-export.json"
FORMAT = "flexmoe-export/1"
MODEL_DIR, ADAPTER_DIR, PERSONAL_FILE = "model", "adapter", "personal.safetensors"


def export_client(run_dir: str | Path, client_id: int, out: str | Path, merge: bool = False,
                  state_dir: str | Path | None = None, device: str | None = None) -> Path:
    """Write client `client_id`'s personalised model to `out` (which must not exist yet)."""
    from flexmoe.engine.restore import restore
    from flexmoe.models.load import _quiet_progress  # no per-shard progress bar on stderr

    out = Path(out)
    if out.exists():
        raise FlexmoeError(f"{out} already exists; export writes a new directory")
    restored = restore(run_dir, client_id, state_dir, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        with _quiet_progress():
            manifest = _write_parts(restored, tmp, merge)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _usual_permissions(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_parts(restored, directory: Path, merge: bool) -> dict:
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
    }


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

        model = PeftModel.from_pretrained(model, path / manifest["adapter"])
    if manifest["personal"]:
        load_personal(model, path / manifest["personal"])
    return model.eval(), tokenizer

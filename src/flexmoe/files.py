"""Files flexmoe writes: atomic replacement, and safetensors files that carry a checksum.

Every file is written to a temporary file in its own directory, then `os.replace`d over its
name, so a reader sees the old file or the new one, never half of one; a failed write (disk
full, read-only directory) removes its temporary file and raises a one-line `FlexmoeError`
naming the file. Tensor files (checkpoints, client state, personal state) carry the sha256
of their tensors in their safetensors metadata; `load_checked` recomputes it and refuses a
truncated, corrupted or unchecksummed file instead of loading it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open  # without torch: text writers stay light

from flexmoe.errors import FlexmoeError

if TYPE_CHECKING:
    import torch

METADATA = "flexmoe"  # the one metadata key: canonical JSON of every metadata item and the checksum
CHECKSUM = "flexmoe.sha256"  # the checksum's item: sha256 of the tensors (names, dtypes, shapes, bytes)


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor in name order: its name, dtype, shape and raw bytes. Independent
    of the file layout, so it is computed the same from the tensors written and those read."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def write_atomic(path: str | os.PathLike, write: Callable[[str], None], what: str = "") -> Path:
    """Call `write(temporary path)`, then move the result over `path`; nothing is left behind
    when it fails. An OSError (no space, no permission, a file where a directory should be)
    becomes a FlexmoeError naming `path` (and `what` it holds)."""
    path = Path(path)
    target = f"{what} to {str(path)!r}" if what else repr(str(path))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same directory: os.replace stays atomic
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(str(tmp))
        os.replace(tmp, path)
    except OSError as err:
        raise FlexmoeError(f"cannot write {target}: {err.strerror or err}") from None
    except SafetensorError as err:  # safetensors reports a failed write as its own error
        raise FlexmoeError(f"cannot write {target}: {one_line(err)}") from None
    finally:
        with contextlib.suppress(OSError):  # also when the directory itself could not be made
            tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    return write_atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def save_checked(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None, what: str = "") -> Path:
    """Write `tensors` atomically as safetensors, with their checksum in the metadata.

    safetensors writes several metadata keys in hash-map order, which differs between processes;
    one key holding canonical JSON makes the same tensors and metadata the same bytes everywhere."""
    from safetensors.torch import save_file

    flat = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    stamped = {METADATA: json.dumps({**(metadata or {}), CHECKSUM: tensors_digest(flat)}, sort_keys=True)}
    return write_atomic(path, lambda tmp: save_file(flat, tmp, metadata=stamped), what)


def unpack_metadata(raw: dict[str, str] | None) -> dict[str, str]:
    """The metadata items of a file `save_checked` wrote (files of flexmoe 0.1's first layout, one
    safetensors key per item, read too)."""
    raw = dict(raw or {})
    if METADATA not in raw:
        return raw
    try:
        items = json.loads(raw[METADATA])
    except json.JSONDecodeError:
        return raw
    return {str(k): str(v) for k, v in items.items()} if isinstance(items, dict) else raw


def load_checked(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a file `save_checked` wrote; refuses it, naming it, when it is
    missing, unreadable, truncated, carries no checksum or its tensors do not match it."""
    path = Path(path)
    if not path.is_file():
        raise FlexmoeError(f"{path}: file not found")
    try:  # framework="pt" imports torch only now
        with safe_open(str(path), framework="pt") as reader:
            metadata = unpack_metadata(reader.metadata())
            tensors = {key: reader.get_tensor(key) for key in reader.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise FlexmoeError(f"{path}: unreadable or truncated safetensors file ({one_line(err)})") from None
    expected = metadata.pop(CHECKSUM, None)
    if expected is None:
        raise FlexmoeError(f"{path}: carries no checksum, so its integrity cannot be verified; refusing to load it")
    if tensors_digest(tensors) != expected:
        raise FlexmoeError(f"{path}: checksum mismatch, the file is corrupted; refusing to load it")
    return tensors, metadata


def one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__

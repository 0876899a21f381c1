"""Builds the shipped builtin data files from a WordNet 3.0 directory, reproducibly."""

from __future__ import annotations

import json
import lzma
import os
import tempfile
from pathlib import Path

from flexmoe.data import wordnet
from flexmoe.data.builtin import CORPUS_FILES, PROBE_FILE
from flexmoe.errors import FlexmoeError


def build_builtin(wordnet_dir: str | Path, out_dir: str | Path) -> dict[str, int]:
    """Writes corpus, probes and instructions to `out_dir`; returns record counts per file."""
    synsets = wordnet.read_wordnet(wordnet_dir)
    probes = wordnet.select_probes(synsets)
    outputs = {
        CORPUS_FILES["train"]: wordnet.corpus_records(synsets, "train"),
        CORPUS_FILES["heldout"]: wordnet.corpus_records(synsets, "heldout"),
        PROBE_FILE: wordnet.probe_records(probes),
    }
    out_dir = Path(out_dir)
    for name, records in outputs.items():
        write_jsonl_xz(out_dir / name, records)
    return {name: len(records) for name, records in outputs.items()}


def write_jsonl_xz(path: Path, records: list[dict]) -> None:
    """xz-compressed JSON lines, written atomically; same records → same bytes."""
    payload = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    write_atomic(path, lzma.compress(payload.encode("utf-8"), format=lzma.FORMAT_XZ,
                                     check=lzma.CHECK_CRC64, preset=6))


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, then rename: never a half-written file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(handle, "wb") as temp:
            temp.write(data)
        os.chmod(temp_name, 0o644)  # mkstemp creates 0600; shipped files must be readable
        os.replace(temp_name, path)
    except OSError as err:
        raise FlexmoeError(f"cannot write {path}: {err}") from None

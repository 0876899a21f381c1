"""The builtin WordNet-derived data shipped in flexmoe/assets/wordnet (no download at run time)."""

from __future__ import annotations

import functools
import json
import lzma
from pathlib import Path

from flexmoe.data.example import Example, Probe
from flexmoe.errors import FlexmoeError

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "wordnet"
CORPUS_FILES = {"train": "corpus-train.jsonl.xz", "heldout": "corpus-heldout.jsonl.xz"}
PROBE_FILE = "probes.jsonl.xz"
INSTRUCTION_FILE = "instructions.jsonl.xz"


@functools.cache
def _records(name: str) -> tuple[dict, ...]:
    path = ASSET_DIR / name
    try:
        with lzma.open(path, "rt", encoding="utf-8") as handle:
            return tuple(json.loads(line) for line in handle)
    except (OSError, lzma.LZMAError, json.JSONDecodeError) as err:
        raise FlexmoeError(f"builtin data file {path} is missing or damaged ({err}); "
                           "rebuild it with `flexmoe data build --wordnet-dir /usr/share/wordnet`") from None


def builtin_corpus(split: str = "train") -> list[str]:
    """Pretraining documents, one per WordNet synset; `heldout` is a disjoint ~3% of synsets."""
    if split not in CORPUS_FILES:
        raise FlexmoeError(f"unknown corpus split {split!r}; valid: {', '.join(CORPUS_FILES)}")
    return [record["text"] for record in _records(CORPUS_FILES[split])]


def builtin_probes() -> list[Probe]:
    """4-option knowledge probes on train-corpus synsets that no instruction example covers."""
    return [Probe(question=r["question"], options=list(r["options"]), answer=r["answer"],
                  domain=r["domain"], id=r["id"]) for r in _records(PROBE_FILE)]


def builtin_examples() -> list[Example]:
    """The builtin instruction dataset (category = task, domain = WordNet lexicographer file)."""
    return [Example(**record) for record in _records(INSTRUCTION_FILE)]

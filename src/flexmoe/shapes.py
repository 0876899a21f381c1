"""The shipped shapes: the architecture fields of public MoE checkpoints' `config.json`
(`assets/shapes/<name>.json`, no weights), and random-init checkpoints of them at cut depth.

Widths, not depth, are where shape, memory and speed bugs live, and a shape's widths fit on a CPU
when its depth is cut: `random_checkpoint` writes a real Hugging Face model directory of a shape
with `layers` decoder layers and the shipped tiny tokenizer's vocabulary, randomly initialised
(seeded) and saved in bf16, which every flexmoe command then loads like a downloaded checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from flexmoe.errors import FlexmoeError

SHAPES_DIR = Path(__file__).resolve().parent / "assets" / "shapes"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def shape_names() -> list[str]:
    return sorted(path.stem for path in SHAPES_DIR.glob("*.json"))


def shape_fields(name: str) -> dict:
    """A shipped shape's config fields (model_type included)."""
    path = SHAPES_DIR / f"{name}.json"
    if not path.is_file():
        raise FlexmoeError(f"unknown shape {name!r} (known: {', '.join(shape_names())})")
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def shape_config(name: str, layers: int | None = None, vocab_size: int | None = None):
    """The transformers config of a shipped shape; `layers`/`vocab_size` cut its depth and vocabulary
    (DeepSeek's dense first layers stay: `first_k_dense_replace` is kept below `layers`)."""
    from transformers import AutoConfig

    fields = shape_fields(name)
    if layers is not None:
        fields["num_hidden_layers"] = layers
        if "first_k_dense_replace" in fields:
            fields["first_k_dense_replace"] = min(fields["first_k_dense_replace"], layers - 1)
    if vocab_size is not None:
        fields["vocab_size"] = vocab_size
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def random_checkpoint(name: str, out_dir: Path, layers: int, seed: int = 0,
                      dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write shape `name` cut to `layers` layers with the tiny tokenizer, random weights (seeded),
    in `dtype`, as a model directory `out_dir` (save_pretrained + the tokenizer files)."""
    from transformers import AutoModelForCausalLM

    from flexmoe.models.load import tiny_path

    tokenizer_dir = tiny_path()
    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    config = shape_config(name, layers=layers, vocab_size=vocab)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 1, 2  # the tiny tokenizer's ids
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    del model
    for file in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / file, out_dir / file)
    return out_dir

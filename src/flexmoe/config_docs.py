"""Write docs/config.md from the run configuration model, so the reference cannot drift.

Every key's type, allowed values, bounds and default come from the pydantic model in
`flexmoe.config`; its meaning from the field's `description`, else the comment written beside
(or just above) the field in config.py, else `MEANINGS` below. A test checks that the
committed docs/config.md equals what this module generates and that every key has a meaning.

    python -m flexmoe.config_docs            # rewrite docs/config.md
    python -m flexmoe.config_docs --check    # exit 1 if docs/config.md is out of date
"""

from __future__ import annotations

import argparse
import inspect
import io
import sys
import tokenize
import typing
from pathlib import Path

from pydantic import BaseModel

from flexmoe.config import RunConfig
from flexmoe.files import write_text_atomic
from flexmoe.methods import registered

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "config.md"

# Meanings of the keys config.py leaves without a comment.
MEANINGS = {
    "method": "federated method: FLEx, FC-MoE, their combination, or a baseline (see docs/guide.md)",
    "rounds": "federated rounds",
    "num_clients": "clients the data is partitioned into",
    "seed": "seed of every random choice: partition, sampling, LoRA init, selection, batches",
    "model": '"tiny" (the shipped pretrained MoE) or a local Hugging Face MoE checkpoint directory',
    "data.format": "format of data.source; auto guesses it from the file name",
    "data.partition": "how examples are split over clients: by group (non-IID), IID, Dirichlet, or by size",
    "data.by": "the example field the non-IID partitions group by",
    "data.test_fraction": "share of each client's examples held out as its test split",
    "data.template": "prompt template: Alpaca's, or the tokenizer's own chat template",
    "train.optimizer": "client optimiser",
    "train.lr": "peak local learning rate",
    "train.schedule": "learning-rate schedule over rounds",
    "train.weight_decay": "decoupled weight decay (AdamW) or L2 (SGD)",
    "train.local_steps": "optimiser steps per client per round",
    "train.batch_size": "examples per micro-batch",
    "train.grad_accum": "micro-batches per optimiser step",
    "train.max_length": "tokens per example (prompt + response), longer ones are cut",
    "lora.r": "LoRA rank",
    "lora.alpha": "LoRA scaling numerator (scale = alpha / r)",
    "lora.dropout": "dropout on the LoRA input",
    "flex.gate": 'adaptive gate of the grafted expert: y + sigmoid(w.x + b) G(x), or "none": y + G(x)',
    "flex.selection": "how each client picks the expert to graft; random and frequency are ablations",
    "flex.k": "experts grafted per MoE layer",
    "flex.gate_init_bias": "initial gate bias b; negative starts nearly closed (the base model's behaviour)",
    "flex.calibration_examples": "client training examples used to select the grafted expert",
    "flex.calibration_max_tokens": "tokens sampled from them for the reconstruction loss",
    "flex.federate_routers": "also train and federate the MoE routers (routing-drift study)",
    "flex.aggregator": "server optimiser over the shared LoRA",
    "fcmoe.frequency_power": "exponent of the client's activation frequency of the expert in c_{i,k}",
    "fcmoe.norm_power": "exponent of the update norm in c_{i,k}",
    "fcmoe.size_power": "exponent of the client's number of examples in c_{i,k}",
    "fedprox.mu": "FedProx proximal coefficient (0 = FedAvg)",
    "scaffold.server_lr": "SCAFFOLD global step size",
    "server.weighting": "weight of each reply in the average: its number of examples, or equal",
    "server.beta1": "first-moment decay (FedAdam, FedYogi)",
    "server.beta2": "second-moment decay (FedAdam, FedYogi, FedAdagrad)",
    "server.tau": "adaptivity epsilon of the adaptive server optimisers",
    "eval.batch_size": "batch size of evaluation generation and scoring",
    "eval.max_new_tokens": "tokens generated per test example for ROUGE-L",
    "eval.knowledge": "held-out LM loss of every personalised model on the builtin held-out corpus",
    "eval.knowledge_max_docs": "held-out documents scored at the last round (paired per document with the base)",
    "eval.knowledge_max_length": "tokens per held-out document",
}


def sections() -> list[tuple[str, type[BaseModel]]]:
    """("", RunConfig) for the top-level keys, then (name, model) for every section."""
    out = [("", RunConfig)]
    for name, field in RunConfig.model_fields.items():
        if _is_section(field.annotation):
            out.append((name, field.annotation))
    return out


def _is_section(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def field_comments(model: type[BaseModel]) -> dict[str, str]:
    """{field: comment} from the class source: the comment on the field's line, else the block
    of comment lines just above it."""
    lines = inspect.getsource(model).splitlines()
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO("\n".join(lines) + "\n").readline)
                if tok.type == tokenize.COMMENT}
    out = {}
    for number, text in enumerate(lines, start=1):
        name = text.strip().partition(":")[0]
        if name not in model.model_fields or name in out:
            continue
        above, row = [], number - 1
        while row >= 1 and lines[row - 1].strip().startswith("#"):
            above.insert(0, comments[row])
            row -= 1
        comment = comments.get(number) or " ".join(above)
        if comment:
            out[name] = comment
    return out


def meaning(section: str, name: str, model: type[BaseModel]) -> str | None:
    key = f"{section}.{name}" if section else name
    description = model.model_fields[name].description
    return description or field_comments(model).get(name) or MEANINGS.get(key)


def value_kind(field) -> str:
    annotation = field.annotation
    if field is RunConfig.model_fields["method"]:  # a name from the method registry
        return " \\| ".join(f"`{name}`" for name in registered())
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(f"`{value}`" for value in typing.get_args(annotation))
    kind = getattr(annotation, "__name__", str(annotation))
    bounds = []
    for rule in field.metadata:
        for attr, symbol in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if getattr(rule, attr, None) is not None:
                bounds.append(f"{symbol} {getattr(rule, attr)}")
    return kind + (f" ({', '.join(bounds)})" if bounds else "")


def _default(field) -> str:
    value = field.default
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value}`"


def _table(section: str, model: type[BaseModel]) -> list[str]:
    rows = ["| key | values | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if _is_section(field.annotation):
            continue
        key = f"{section}.{name}" if section else name
        text = (meaning(section, name, model) or "").replace("|", "\\|")
        rows.append(f"| `{key}` | {value_kind(field)} | {_default(field)} | {text} |")
    return rows


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m flexmoe.config_docs` from flexmoe/config.py; do not edit by hand. -->",
        "",
        "Every key has a default: an empty config is FLEx on the shipped tiny MoE and the builtin dataset.",
        "Set keys in a TOML file (`flexmoe run --config FILE`, sections as `[train]` tables) or on the",
        "command line (`--set train.lr=3e-4`, repeatable). A run directory keeps the resolved config in",
        "`config.toml`. Unknown keys and out-of-range values are refused with the key's name.",
        "",
    ]
    for section, model in sections():
        lines.append(f"## `[{section}]`" if section else "## Top level")
        lines.append("")
        doc = inspect.getdoc(model) if section else None
        if doc and doc != inspect.getdoc(BaseModel):
            lines.extend([doc, ""])
        lines.extend(_table(section, model))
        lines.append("")
    return "\n".join(lines)


def undocumented() -> list[str]:
    """Keys without a meaning (the test requires none)."""
    return [f"{section}.{name}" if section else name
            for section, model in sections() for name, field in model.model_fields.items()
            if not _is_section(field.annotation) and not meaning(section, name, model)]


def stale_meanings() -> list[str]:
    """MEANINGS entries that no longer name a key."""
    models = dict(sections())
    return [key for key in MEANINGS
            if key.rpartition(".")[2] not in getattr(models.get(key.rpartition(".")[0]), "model_fields", {})]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flexmoe.config_docs", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/config.md differs from the generated text")
    parser.add_argument("--out", type=Path, default=DOC_PATH, help=f"where to write (default {DOC_PATH})")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date: run python -m flexmoe.config_docs", file=sys.stderr)
            return 1
        return 0
    write_text_atomic(args.out, text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The usage tests' world: a Dolly file over the engine tests' word lists, a FLEx run trained on
it, and the commands run as `flexmoe NAME argv` would run them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from helpers.engine import DOMAINS, build_tokenizer
from helpers.tiny import tiny_model

CATEGORIES = DOMAINS  # the engine tests' word lists, used here as Dolly categories
PROMPT = "describe the word cat"


def write_dolly(path: Path) -> Path:
    with path.open("w") as handle:
        for category, words in CATEGORIES.items():
            for i in range(10):
                word, other = words[i % len(words)], words[(i + 1) % len(words)]
                record = {"instruction": f"describe the word {word}", "context": "",
                          "response": f"a {word} is a {other} of {category}", "category": category}
                handle.write(json.dumps(record) + "\n")
    return path


def save_model(path: Path, seed: int) -> str:
    vocab = build_tokenizer(path)
    tiny_model("qwen2_moe", seed=seed, vocab_size=vocab, max_position_embeddings=128).save_pretrained(path)
    return str(path)


def train(model_dir: str, data: Path, out: Path, *overrides: str) -> Path:
    from flexmoe.config import load_config
    from flexmoe.engine.simulation import Simulation

    config = load_config(None, [
        f'model="{model_dir}"', f'data.source="{data}"', "data.by=category", "rounds=2", "num_clients=4",
        "clients_per_round=4", "seed=5", "train.local_steps=3", "train.batch_size=4", "train.max_length=64",
        "train.lr=2e-2", "lora.r=2", "flex.calibration_examples=4", "flex.gate_init_bias=2.0",
        "eval.max_test_examples=2", "eval.max_new_tokens=6", "eval.knowledge_max_docs=3",
        "eval.knowledge_max_length=32", "eval.max_probes=8", "data.test_fraction=0.2", *overrides,
    ])
    Simulation(config, out).run()
    return out


def command(name: str, argv: list[str]) -> int:
    """Parse `argv` with the command's own arguments and run it (what `flexmoe NAME argv` does)."""
    import importlib

    module = importlib.import_module(f"flexmoe.commands.{name}")
    parser = argparse.ArgumentParser(prog=f"flexmoe {name}")
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def logits(model, tokenizer, text: str = PROMPT) -> torch.Tensor:
    enc = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits

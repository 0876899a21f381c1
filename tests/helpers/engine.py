"""The engine tests' small world: synthetic examples over four word domains, a word-level
tokenizer over their words, the 2-round run config of the tiny model, and reading a run back."""

from __future__ import annotations

import json
from pathlib import Path

import torch

DOMAINS = {
    "animals": ["cat", "dog", "horse", "bird", "fish", "cow"],
    "food": ["bread", "apple", "rice", "cheese", "soup", "bean"],
    "tools": ["hammer", "saw", "drill", "wrench", "nail", "rope"],
    "places": ["city", "river", "hill", "farm", "town", "lake"],
}
TEMPLATE_WORDS = (
    "Below is an instruction that describes a task . Write a response that appropriately completes the request "
    "### Instruction : Input Response describe name the word what is a an of , paired with input provides further context"
).split()


def synthetic_examples():
    from flexmoe.data import Example

    examples = []
    for domain, words in DOMAINS.items():
        for i in range(12):
            word, other = words[i % len(words)], words[(i + 1) % len(words)]
            examples.append(Example(instruction=f"describe the word {word}", response=f"a {word} is a {other} of {domain}",
                                    category="describe", domain=domain, id=f"{domain}-{i}"))
    return examples


def build_tokenizer(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = sorted({w for ws in DOMAINS.values() for w in ws} | set(DOMAINS) | set(TEMPLATE_WORDS))
    vocab = {token: i for i, token in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(path)
    return len(vocab)


def engine_config(model_dir: str, *overrides: str):
    """A 2-round, 4-client run of the tiny model on the synthetic set: the engine tests' config."""
    from flexmoe.config import load_config

    return load_config(None, [
        f'model="{model_dir}"', "rounds=2", "num_clients=4", "clients_per_round=2", "seed=3",
        "train.local_steps=2", "train.batch_size=4", "train.max_length=64", "train.lr=5e-3",
        "lora.r=2", "flex.calibration_examples=4", "eval.max_test_examples=2", "eval.max_new_tokens=4",
        "eval.knowledge=false", "data.test_fraction=0.2", *overrides,
    ])


def run(model_dir: str, out: Path, *overrides: str, stop_after: int | None = None) -> dict:
    from flexmoe.engine.simulation import Simulation

    return Simulation(engine_config(model_dir, *overrides), out).run(stop_after=stop_after)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_safetensors(a: Path, b: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        assert fa.metadata() == fb.metadata()
        assert sorted(fa.keys()) == sorted(fb.keys())
        for key in fa.keys():
            assert torch.equal(fa.get_tensor(key), fb.get_tensor(key)), key

"""The pretraining tests' corpus: short synthetic dictionary entries, and the settings of a tiny
pretraining run on it."""

from __future__ import annotations

import json
import random

CORPUS_WORDS = ["stone", "river", "light", "bird", "song", "tree", "cold", "bright", "small", "green"]
CORPUS_DOMAINS = ["animal", "plant", "artifact"]


def corpus_documents(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(CORPUS_WORDS)}{i} (noun, {rng.choice(CORPUS_DOMAINS)}): a {rng.choice(CORPUS_WORDS)} "
            f"{rng.choice(CORPUS_WORDS)} that is {rng.choice(CORPUS_WORDS)}. It is a kind of {rng.choice(CORPUS_WORDS)}."
            for i in range(count)]


def tiny_pretrain_overrides(corpus_files, steps: int = 6) -> list[str]:
    return [f"data.corpus={json.dumps(str(corpus_files / 'train.txt'))}",
            f"data.heldout={json.dumps(str(corpus_files / 'heldout.txt'))}", 'data.probes="none"',
            "tokenizer.vocab_size=320", "model.hidden_size=32", "model.num_hidden_layers=2",
            "model.num_attention_heads=2", "model.num_key_value_heads=2", "model.moe_intermediate_size=16",
            "model.shared_expert_intermediate_size=32", "model.max_position_embeddings=64",
            f"train.steps={steps}", "train.batch_size=4", "train.seq_len=32", "train.warmup_steps=2",
            "train.log_every=1", "train.eval_every=3", "train.eval_docs=10", "train.checkpoint_every=3",
            "train.lr=0.01", 'eval.generation_prompts=["stone1 (noun, animal):"]', "eval.max_new_tokens=5",
            "eval.batch_size=8"]

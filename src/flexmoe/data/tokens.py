"""Tokenization for causal-LM fine-tuning (prompt masked out of the loss) and batch collation."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flexmoe.data.example import Example
from flexmoe.data.prompts import format_prompt
from flexmoe.errors import FlexmoeError

IGNORE_INDEX = -100  # label value torch's cross-entropy skips


def tokenize_examples(examples: Sequence[Example], tokenizer, max_length: int = 256,
                      template: str = "alpaca") -> list[dict]:
    """`input_ids` = prompt + response + eos, `labels` the same with prompt tokens = -100.

    Prompt and response are tokenized separately so the mask boundary is exact. Sequences
    are cut to `max_length` from the right; an example whose prompt alone fills it keeps
    no supervised token (all labels -100), which the loss then ignores.
    """
    if max_length < 1:
        raise FlexmoeError(f"max_length must be at least 1, got {max_length}")
    if tokenizer.eos_token_id is None:
        raise FlexmoeError("the tokenizer has no eos token; responses could not be terminated")
    # The chat template writes its own special tokens; the Alpaca prompt gets the tokenizer's (e.g. BOS).
    add_special = template != "chat"
    features = []
    for example in examples:
        prompt = tokenizer(format_prompt(example, template, tokenizer), add_special_tokens=add_special)["input_ids"]
        response = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        input_ids = (prompt + response)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_length]
        features.append({"input_ids": input_ids, "labels": labels})
    return features


def collate(features: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pads a batch: padded input positions get `pad_token_id`, mask 0 and label -100."""
    if not features:
        raise FlexmoeError("cannot collate an empty batch")
    if pad_token_id is None:
        raise FlexmoeError("collate needs a pad token id (the tokenizer has none: set pad_token)")
    width = max(len(feature["input_ids"]) for feature in features)
    input_ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    for row, feature in enumerate(features):
        length = len(feature["input_ids"])
        input_ids[row, :length] = torch.tensor(feature["input_ids"], dtype=torch.long)
        attention_mask[row, :length] = 1
        labels[row, :length] = torch.tensor(feature["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

"""Tokenization for causal-LM fine-tuning (prompt masked out of the loss) and batch collation."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flexmoe.data.example import Example
from flexmoe.data.prompts import format_prompt
from flexmoe.errors import FlexmoeError
from flexmoe.heap import release_freed_memory

IGNORE_INDEX = -100  # label value torch's cross-entropy skips

log = logging.getLogger("flexmoe.data")


@dataclass
class Truncation:
    """What `tokenize_examples` had to cut to fit `max_length`."""

    examples: int = 0
    truncated: int = 0  # examples cut at all (the context, else the prompt's middle, first)
    response_cut: int = 0  # of those, examples whose response itself lost its tail
    unusable: int = 0  # examples left with no supervised token (the loss ignores them)


def tokenize_examples(examples: Sequence[Example], tokenizer, max_length: int = 256,
                      template: str = "alpaca", counts: Truncation | None = None) -> list[dict]:
    """`input_ids` = prompt + response + eos, `labels` the same with prompt tokens = -100.

    Prompt and response are tokenized separately so the mask boundary is exact. An example
    longer than `max_length` keeps its answer: the response keeps up to `max_length` minus
    half of it (or minus the whole prompt, if shorter); the prompt fits the rest by cutting its
    context from the end, then, if still too long, tokens from its middle (the template's head
    and the "### Response:" cue stay). `counts`, when given, is incremented.
    """
    if max_length < 1:
        raise FlexmoeError(f"max_length must be at least 1, got {max_length}")
    if tokenizer.eos_token_id is None:
        raise FlexmoeError("the tokenizer has no eos token; responses could not be terminated")
    # The chat template writes its own special tokens; the Alpaca prompt gets the tokenizer's (e.g. BOS).
    add_special = template != "chat"
    counts = counts if counts is not None else Truncation()
    features = []
    # one tokenizer call per list, not per example: the same ids, many times faster on large splits
    prompts = _encode(tokenizer, [format_prompt(e, template, tokenizer) for e in examples], add_special)
    responses = _encode(tokenizer, [e.response for e in examples], False)
    for example, prompt, response in zip(examples, prompts, responses):
        response = response + [tokenizer.eos_token_id]
        counts.examples += 1
        if len(prompt) + len(response) > max_length:
            counts.truncated += 1
            prompt, response = _fit(example, prompt, response, tokenizer, template, add_special, max_length)
            counts.response_cut += bool(response) and response[-1] != tokenizer.eos_token_id
        counts.unusable += not response
        features.append({"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response})
    return features


# examples tokenised per call: the ids are Python-int lists (~146 bytes a token) until `compact`; a whole
# client of the builtin set at once (20k examples) raised the RSS by ~300 MB that stayed
# (benchmarks/results/rss-2026-12-02.md); a chunk keeps the batched tokenizer call's speed
TOKENIZE_CHUNK = 1024


def training_features(examples: Sequence[Example], tokenizer, max_length: int, template: str,
                      client_id: int) -> tuple[list[dict], Truncation]:
    """A client's training features and what truncation cost it (logged when anything was cut)."""
    counts = Truncation()
    log.info("client %d: tokenizing %d training examples", client_id, len(examples))
    features = []
    for start in range(0, len(examples), TOKENIZE_CHUNK):  # Python-int lists only of one chunk at a time
        chunk = examples[start : start + TOKENIZE_CHUNK]
        features += [compact(f) for f in
                     tokenize_examples(chunk, tokenizer, max_length=max_length, template=template, counts=counts)]
    release_freed_memory()  # the chunks' Python-int lists
    if counts.truncated or counts.unusable:
        log.info("client %d: %d of %d training examples longer than train.max_length = %d were cut "
                 "(context first; %d lost the tail of their response); %d unusable", client_id, counts.truncated,
                 counts.examples, max_length, counts.response_cut, counts.unusable)
    return features, counts


def _encode(tokenizer, texts: list[str], add_special: bool) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=add_special)["input_ids"] if texts else []


def _prompt_ids(example: Example, tokenizer, template: str, add_special: bool) -> list[int]:
    return tokenizer(format_prompt(example, template, tokenizer), add_special_tokens=add_special)["input_ids"]


def _fit(example: Example, prompt: list[int], response: list[int], tokenizer, template: str,
         add_special: bool, max_length: int) -> tuple[list[int], list[int]]:
    response = response[: max_length - min(len(prompt), max_length // 2)]
    budget = max_length - len(response)
    if len(prompt) > budget and example.context:
        prompt = _shorter_context(example, budget, tokenizer, template, add_special) or prompt
    if len(prompt) > budget:
        head = budget // 4
        prompt = prompt[:head] + prompt[len(prompt) - (budget - head):] if budget else []
    return prompt, response


def _shorter_context(example: Example, budget: int, tokenizer, template: str, add_special: bool) -> list[int] | None:
    """The prompt with the longest head of the context that fits `budget` tokens (binary search
    over characters), or None when even no context does not fit."""
    low, high, best = 0, len(example.context), None
    while low <= high:
        middle = (low + high) // 2
        ids = _prompt_ids(dataclasses.replace(example, context=example.context[:middle]), tokenizer, template,
                          add_special)
        if len(ids) <= budget:
            best, low = ids, middle + 1
        else:
            high = middle - 1
    return best


def compact(feature: dict) -> dict:
    """A feature as int32 tensors: a client holds its features for the whole run, and as lists of
    Python ints they took ~146 bytes a token (606 MB for the builtin set's 4.2M tokens) against 8."""
    return {key: torch.tensor(ids, dtype=torch.int32) for key, ids in feature.items()}


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
        input_ids[row, :length] = torch.as_tensor(feature["input_ids"], dtype=torch.long)  # lists or `compact`
        attention_mask[row, :length] = 1
        labels[row, :length] = torch.as_tensor(feature["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


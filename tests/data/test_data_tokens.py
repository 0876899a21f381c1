"""Prompt templates, masked tokenization and collation, with a small BPE tokenizer built here."""

from __future__ import annotations

import pytest
import torch

from flexmoe.data import IGNORE_INDEX, Example, collate, format_prompt, tokenize_examples
from flexmoe.data.tokens import Truncation
from flexmoe.errors import FlexmoeError
from helpers.tokens import WITHOUT_CONTEXT, WITH_CONTEXT, small_bpe_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return small_bpe_tokenizer()


def test_alpaca_prompt_with_and_without_context():
    assert format_prompt(WITH_CONTEXT) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\n"
        "Translate the sentence into French.\n\n### Input:\nThe cat sleeps.\n\n### Response:\n")
    assert format_prompt(WITHOUT_CONTEXT) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nName a primary colour.\n\n### Response:\n")


def test_chat_prompt_uses_tokenizer_template(tokenizer):
    assert format_prompt(WITH_CONTEXT, "chat", tokenizer) == (
        "<|user|>Translate the sentence into French.\n\nThe cat sleeps.</s><|assistant|>")


def test_prompt_errors(tokenizer):
    with pytest.raises(FlexmoeError, match="valid: alpaca, chat"):
        format_prompt(WITH_CONTEXT, "vicuna")
    with pytest.raises(FlexmoeError, match="needs a tokenizer that has a chat template"):
        format_prompt(WITH_CONTEXT, "chat", None)


def test_prompt_is_masked_and_response_plus_eos_kept(tokenizer):
    [feature] = tokenize_examples([WITH_CONTEXT], tokenizer, max_length=512)
    prompt_ids = tokenizer(format_prompt(WITH_CONTEXT))["input_ids"]
    response_ids = tokenizer(WITH_CONTEXT.response, add_special_tokens=False)["input_ids"]
    assert prompt_ids[0] == tokenizer.bos_token_id
    assert feature["input_ids"] == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert feature["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [tokenizer.eos_token_id]
    supervised = [t for t in feature["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == "Le chat dort.</s>"


def test_fitting_examples_are_not_touched(tokenizer):
    counts = Truncation()
    [full] = tokenize_examples([WITH_CONTEXT], tokenizer, max_length=512, counts=counts)
    [exact] = tokenize_examples([WITH_CONTEXT], tokenizer, max_length=len(full["input_ids"]), counts=counts)
    assert exact == full and counts == Truncation(examples=2)


LONG_CONTEXT = Example(instruction="Translate the sentence into French.", context="The cat sleeps. " * 200,
                       response="Le chat dort.")


def test_truncation_cuts_the_context_and_keeps_the_whole_answer(tokenizer):
    counts = Truncation()
    [cut] = tokenize_examples([LONG_CONTEXT], tokenizer, max_length=128, counts=counts)
    response = tokenizer(LONG_CONTEXT.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert 120 <= len(cut["input_ids"]) <= 128  # the context fills the room left
    assert cut["input_ids"][-len(response):] == response  # the answer, whole, with its eos
    assert [t for t in cut["labels"] if t != IGNORE_INDEX] == response
    prompt = tokenizer.decode(cut["input_ids"][: -len(response)], skip_special_tokens=True)
    assert prompt.startswith("Below is an instruction") and "Translate the sentence into French." in prompt
    assert prompt.endswith("### Response:\n") and "The cat sleeps." in prompt  # the context's head stays
    assert counts == Truncation(examples=1, truncated=1)


def test_truncation_of_a_long_prompt_without_context_keeps_its_head_and_cue(tokenizer):
    long_instruction = Example(instruction="Name a primary colour. " * 100, response="Red")
    [cut] = tokenize_examples([long_instruction], tokenizer, max_length=40)
    assert len(cut["input_ids"]) == 40 and cut["input_ids"][0] == tokenizer.bos_token_id
    assert tokenizer.decode([t for t in cut["labels"] if t != IGNORE_INDEX]) == "Red</s>"
    assert tokenizer.decode(cut["input_ids"]).endswith("### Response:\nRed</s>")


def test_a_response_longer_than_max_length_keeps_its_head_and_half_the_room(tokenizer):
    counts = Truncation()
    long_answer = Example(instruction="Name a primary colour.", response="Red colour. " * 100)
    [cut] = tokenize_examples([long_answer], tokenizer, max_length=32, counts=counts)
    supervised = [t for t in cut["labels"] if t != IGNORE_INDEX]
    assert len(cut["input_ids"]) == 32 and len(supervised) == 16  # half the room for the response
    assert tokenizer.decode(supervised).startswith("Red colour.")
    assert counts == Truncation(examples=1, truncated=1, response_cut=1)  # never a zero-label example


def test_chat_template_tokenization_adds_no_extra_bos(tokenizer):
    [feature] = tokenize_examples([WITH_CONTEXT], tokenizer, template="chat")
    prompt_ids = tokenizer(format_prompt(WITH_CONTEXT, "chat", tokenizer), add_special_tokens=False)["input_ids"]
    assert feature["input_ids"][:len(prompt_ids)] == prompt_ids
    assert tokenizer.bos_token_id not in feature["input_ids"]
    assert feature["labels"].count(IGNORE_INDEX) == len(prompt_ids)


def test_collate_pads_right_with_mask_and_ignored_labels(tokenizer):
    features = tokenize_examples([WITH_CONTEXT, WITHOUT_CONTEXT], tokenizer)
    batch = collate(features, tokenizer.pad_token_id)
    lengths = [len(f["input_ids"]) for f in features]
    width = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
    for row, (feature, length) in enumerate(zip(features, lengths)):
        assert batch["input_ids"][row, :length].tolist() == feature["input_ids"]
        assert batch["labels"][row, :length].tolist() == feature["labels"]
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (width - length)
        assert (batch["input_ids"][row, length:] == tokenizer.pad_token_id).all()
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()
    assert batch["input_ids"].dtype == torch.long


def test_collate_errors():
    with pytest.raises(FlexmoeError, match="empty batch"):
        collate([], 0)
    with pytest.raises(FlexmoeError, match="pad token"):
        collate([{"input_ids": [1], "labels": [1]}], None)


def test_a_clients_training_features_are_compact_and_collate_as_the_lists_do(tokenizer):
    from flexmoe.data.tokens import training_features

    examples = [WITH_CONTEXT, WITHOUT_CONTEXT]
    lists = tokenize_examples(examples, tokenizer, max_length=64)
    compact, _ = training_features(examples, tokenizer, 64, "alpaca", client_id=0)
    for as_list, packed in zip(lists, compact):
        assert all(packed[k].dtype == torch.int32 and packed[k].tolist() == as_list[k] for k in as_list)
    pad = tokenizer.pad_token_id
    for key, tensor in collate(lists, pad).items():
        assert torch.equal(collate(compact, pad)[key], tensor) and tensor.dtype == torch.long

"""Personalised ROUGE-L: scores from rouge-score, greedy batched generation with the KV cache."""

from __future__ import annotations

import pytest
import torch

from flexmoe.wire import deserialize, serialize
from flexmoe.eval.rouge import generate_responses, rouge_l


def test_rouge_l_matches_a_hand_computed_lcs():
    # LCS("the cat sat on the mat", "the cat lay on a mat") = "the cat on mat" (4 tokens);
    # P = R = 4/6, F1 = 4/6.
    (score,) = rouge_l(["the cat lay on a mat"], ["the cat sat on the mat"])
    assert score == pytest.approx(4 / 6)
    assert rouge_l(["same words here"], ["same words here"]) == [1.0]
    assert rouge_l(["nothing"], ["else entirely"]) == [0.0]


class _Tokenizer:
    """Just enough of a tokenizer: one id per character (ids 3..), pad 0, eos 2."""

    pad_token_id, eos_token_id = 0, 2
    padding_side = "right"

    def __call__(self, texts, return_tensors="pt", padding=True, truncation=True, max_length=256):
        rows = [[3 + (ord(c) % 90) for c in text][:max_length] for text in texts]
        width = max(map(len, rows))
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            start = width - len(row) if self.padding_side == "left" else 0
            ids[i, start : start + len(row)] = torch.tensor(row)
            mask[i, start : start + len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def batch_decode(self, rows, skip_special_tokens=True):
        return [" ".join(str(int(t)) for t in row if int(t) > 2) for row in rows]


def test_batched_generation_equals_one_by_one_and_restores_padding_side():
    from conftest import tiny_model
    from flexmoe.data import Example

    model = tiny_model("qwen2_moe")
    tokenizer = _Tokenizer()
    examples = [Example(instruction=text, response="x") for text in ("a cat", "the longest prompt here", "dog")]
    batched = generate_responses(model, tokenizer, examples, max_new_tokens=5, batch_size=3)
    single = [generate_responses(model, tokenizer, [e], max_new_tokens=5, batch_size=1)[0] for e in examples]
    assert batched == single and all(batched)
    assert tokenizer.padding_side == "right"


def test_messages_round_trip_with_their_exact_size():
    tensors = {"a.lora_A.weight": torch.randn(2, 8), "b": torch.arange(3, dtype=torch.bfloat16)}
    blob = serialize(tensors, {"num_examples": "12"})
    back, meta = deserialize(blob)
    assert meta == {"num_examples": "12"} and torch.equal(back["a.lora_A.weight"], tensors["a.lora_A.weight"])
    header = int.from_bytes(blob[:8], "little")
    assert len(blob) == 8 + header + 2 * 8 * 4 + 3 * 2  # header + fp32 (2x8) + bf16 (3)

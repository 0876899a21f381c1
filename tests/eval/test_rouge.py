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
    from helpers.tiny import tiny_model
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


def _generate_reference(model, tokenizer, prompts, max_new_tokens):
    """transformers' greedy `generate`, one prompt at a time, new tokens up to eos."""
    rows = []
    for prompt in prompts:
        enc = tokenizer([prompt], return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        row = out[0, enc["input_ids"].shape[1]:].tolist()
        rows.append(row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row)
    return rows


@pytest.mark.parametrize("eos_early", [False, True])
def test_greedy_decode_gives_generates_tokens(eos_early):
    """The joined-cache decode with rows leaving the batch gives, token for token, what
    `generate` gives each prompt alone; with eos made likely, rows end at different steps."""
    from flexmoe.eval.rouge import greedy_decode
    from flexmoe.models import load_base

    model, tokenizer = load_base("tiny")
    if eos_early:  # push eos up, so that rows end at different steps and leave the batch
        with torch.no_grad():
            model.lm_head.weight[tokenizer.eos_token_id] *= 4.0
    prompts = ["The noun \"dog\" means", "Define", "What is the opposite of the adjective \"wet\"? Answer:",
               "A cat is a kind of", "Name three things that are red and round and often eaten", "The"]
    tokenizer.padding_side = "left"
    chunks = []
    for start in (0, 2, 5):  # chunks of different widths, joined into one cache
        enc = tokenizer(prompts[start:{0: 2, 2: 5, 5: 6}[start]], return_tensors="pt", padding=True)
        chunks.append((enc["input_ids"], enc["attention_mask"]))
    tokenizer.padding_side = "right"
    got = greedy_decode(model, chunks, 12, tokenizer.eos_token_id, tokenizer.pad_token_id)
    expected = _generate_reference(model, tokenizer, prompts, 12)
    assert got == expected
    if eos_early:
        assert len({len(row) for row in got}) > 1  # rows left the batch at different steps


def test_generate_responses_keep_the_order_of_the_examples():
    from flexmoe.data import Example
    from flexmoe.models import load_base

    model, tokenizer = load_base("tiny")
    examples = [Example(instruction=text, response="x") for text in
                ("Define the noun \"dog\".", "Define the noun \"encyclopedia of the natural world\".", "Define \"a\".")]
    together = generate_responses(model, tokenizer, examples, max_new_tokens=8, batch_size=2)
    alone = [generate_responses(model, tokenizer, [e], max_new_tokens=8, batch_size=1)[0] for e in examples]
    assert together == alone and len(set(together)) > 1


def test_preallocated_cache_layer_holds_what_a_growing_layer_holds():
    """Written in place, selected by row: the same keys and values, bit for bit, as transformers'
    DynamicLayer fed the same updates (which concatenates); the buffer's unfilled part (NaN here)
    is never exposed."""
    from transformers.cache_utils import DynamicLayer

    from flexmoe.eval.rouge import _PreallocatedLayer

    generator = torch.Generator().manual_seed(0)
    keys, values = (torch.randn(5, 2, 7, 4, generator=generator) for _ in range(2))
    buffers = [torch.full((5, 2, 7 + 3, 4), float("nan")) for _ in range(2)]
    for buffer, filled in zip(buffers, (keys, values)):
        buffer[:, :, :7] = filled
    growing, preallocated = DynamicLayer(), _PreallocatedLayer(*buffers, length=7)
    growing.update(keys, values)
    for step in range(3):
        new_keys, new_values = (torch.randn(len(growing.keys), 2, 1, 4, generator=generator) for _ in range(2))
        expected, got = growing.update(new_keys, new_values), preallocated.update(new_keys, new_values)
        assert all(torch.equal(a, b) for a, b in zip(expected, got))
        if step == 0:  # two rows end and leave the batch
            kept = torch.tensor([0, 2, 4])
            growing.batch_select_indices(kept)
            preallocated.batch_select_indices(kept)
    assert preallocated.get_seq_length() == growing.get_seq_length() == 10
    assert torch.equal(preallocated.keys, growing.keys) and torch.equal(preallocated.values, growing.values)


def test_joined_caches_are_the_chunks_left_padded_with_zeros_and_their_masks_alike():
    """Two prefilled chunks of different widths joined: bit for bit what padding each chunk's keys
    and values on the left with zeros and stacking them gives, whatever the buffers held before."""
    from transformers import DynamicCache

    from flexmoe.eval.rouge import _joined

    generator = torch.Generator().manual_seed(1)
    caches, masks = [], []
    for rows, width in ((2, 5), (3, 3)):
        cache = DynamicCache()
        for layer in range(2):
            cache.update(*(torch.randn(rows, 2, width, 4, generator=generator) for _ in range(2)), layer)
        caches.append(cache)
        masks.append(torch.ones(rows, width, dtype=torch.long))
    with torch.no_grad():
        torch.empty(64, 1024).fill_(float("nan"))  # leave NaN in freed memory a buffer may reuse
    joined, mask = _joined(caches, masks, new_tokens=4)
    for layer in range(2):
        for name in ("keys", "values"):
            expected = torch.cat([torch.nn.functional.pad(getattr(c.layers[layer], name), (0, 0, 5 - m.shape[1], 0))
                                  for c, m in zip(caches, masks)])
            got = getattr(joined.layers[layer], name)
            assert got.shape == (5, 2, 5, 4) and torch.equal(got, expected)
    assert mask.tolist() == [[1] * 5] * 2 + [[0, 0, 1, 1, 1]] * 3

"""Personalised ROUGE-L: greedy generation on a client's test split, scored with rouge-score.

Generation is one batched greedy decode per `batch_size` prompts (left padding) with the KV
cache (`greedy_decode`), kept in buffers with room for every new token: a row leaves the batch,
and its cache, as soon as it has produced eos, and decoding stops when every row has ended or
`max_new_tokens` is reached. The answers are the ones `model.generate(do_sample=False)` gives
(tests/eval/test_rouge.py checks it token for token); a model whose generation config asks for
more than plain greedy decoding (repetition penalty, minimum length, ...) is decoded by
`generate` itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer
from transformers import DynamicCache, GenerationConfig
from transformers.cache_utils import Cache, DynamicLayer

from flexmoe.data import Example, format_prompt
from flexmoe.models.families import unwrap

# generation-config settings under which greedy decoding is more than argmax (logits processors)
_PROCESSING = ("repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "min_length", "min_new_tokens",
               "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id",
               "sequence_bias", "encoder_repetition_penalty", "exponential_decay_length_penalty")


def generate_responses(
    model, tokenizer, examples: list[Example], template: str = "alpaca",
    max_new_tokens: int = 32, batch_size: int = 8, max_prompt_length: int = 256,
) -> list[str]:
    """Greedy completions of each example's prompt (the prompt itself stripped). Prompts are
    read (prefilled) `batch_size` at a time, similar lengths together so little is padding; then
    all of them decode as one batch. A row's answer does not depend on the rows beside it."""
    prompts = [format_prompt(e, template=template, tokenizer=tokenizer) for e in examples]
    if not prompts:
        return []
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # characters: near enough to tokens
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # so every prompt ends where generation starts
    try:
        chunks = []
        for start in range(0, len(order), batch_size):
            enc = tokenizer([prompts[i] for i in order[start : start + batch_size]], return_tensors="pt",
                            padding=True, truncation=True, max_length=max_prompt_length)
            chunks.append((enc["input_ids"].to(device), enc["attention_mask"].to(device)))  # onto the model's device
        new_tokens = greedy_decode(model, chunks, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id)
        decoded = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    outputs = [""] * len(prompts)
    for i, text in zip(order, decoded):
        outputs[i] = text.strip()
    return outputs


def plain_greedy(model) -> bool:
    """Whether the model's generation config adds nothing to argmax decoding."""
    config = getattr(unwrap(model), "generation_config", None)
    if config is None:
        return True
    default = GenerationConfig()
    return all(getattr(config, key, None) == getattr(default, key, None) for key in _PROCESSING)


@torch.no_grad()
def greedy_decode(model, chunks: list[tuple[torch.Tensor, torch.Tensor]], max_new_tokens: int,
                  eos_token_id: int | None, pad_token_id: int | None) -> list[list[int]]:
    """The new tokens of every row of `chunks` ((input_ids, attention_mask) pairs, left-padded),
    in order, greedy, eos included when reached: what `model.generate(do_sample=False)` returns
    for them, without the pad tokens after eos. Each chunk is prefilled alone; their caches are
    then joined (left-padded to the longest) and decoded as one batch."""
    if not plain_greedy(model):
        return [row for ids, mask in chunks for row in _generate(model, ids, mask, max_new_tokens, eos_token_id,
                                                                 pad_token_id)]
    caches, masks, positions, logits = [], [], [], []
    for input_ids, attention_mask in chunks:
        # positions as generate counts them: from each row's first real token
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        cache = DynamicCache(config=unwrap(model).config)
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                    use_cache=True, logits_to_keep=1)
        caches.append(cache)
        masks.append(attention_mask)
        positions.append(position_ids[:, -1:])
        logits.append(out.logits[:, -1])
    if not all(type(layer) is DynamicLayer for cache in caches for layer in cache.layers):
        # a sliding-window (or other) cache cannot be joined by padding: decode chunk by chunk
        return [row for cache, mask, position, first in zip(caches, masks, positions, logits)
                for row in _decode(model, cache, mask, position, first, max_new_tokens, eos_token_id)]
    cache, mask = _joined(caches, masks, max_new_tokens)
    return _decode(model, cache, mask, torch.cat(positions), torch.cat(logits), max_new_tokens, eos_token_id)


class _PreallocatedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in buffers (rows, heads, capacity, width) whose
    first `length` positions are filled: a decode step writes its position in place and attention reads a view of the filled part,
    where `DynamicLayer` copies the whole cache into a new tensor (`torch.cat`) at every step,
    which was a third of greedy decoding's time. The views hold the same values in the same
    shapes, so the logits are the same."""

    def __init__(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int):
        super().__init__()
        self._key_buffer, self._value_buffer, self._length = key_buffer, value_buffer, length
        self.device, self.is_initialized = key_buffer.device, True
        self._expose()

    def _expose(self) -> None:
        self.keys = self._key_buffer[:, :, : self._length]
        self.values = self._value_buffer[:, :, : self._length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self._length + key_states.shape[-2]  # within capacity: `_joined` leaves room for every new token
        self._key_buffer[:, :, self._length : end] = key_states
        self._value_buffer[:, :, self._length : end] = value_states
        self._length = end
        self._expose()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._key_buffer, self._value_buffer = self._key_buffer[indices], self._value_buffer[indices]
        self._expose()


def _joined(caches: list[DynamicCache], masks: list[torch.Tensor], new_tokens: int) -> tuple[Cache, torch.Tensor]:
    """One cache (and attention mask) of all rows, with room for `new_tokens` more positions: each
    chunk's keys and values left-padded to the longest chunk with masked zeros, as if the rows had
    been padded together. Each chunk is written once, into its place in the buffer."""
    width = max(mask.shape[1] for mask in masks)
    rows = sum(mask.shape[0] for mask in masks)
    layers = []
    for index in range(len(caches[0].layers)):
        buffers = []
        for name in ("keys", "values"):
            first = getattr(caches[0].layers[index], name)
            buffer = first.new_empty((rows, first.shape[1], width + new_tokens, first.shape[-1]))
            start = 0
            for cache in caches:
                part = getattr(cache.layers[index], name)
                end, pad = start + part.shape[0], width - part.shape[2]
                buffer[start:end, :, :pad] = 0  # masked out, but must be finite: attention's 0 * NaN is NaN
                buffer[start:end, :, pad:width] = part
                start = end
            buffers.append(buffer)  # past `width`: unwritten until a decode step fills it, never read before
        layers.append(_PreallocatedLayer(*buffers, width))
    return Cache(layers=layers), torch.cat([F.pad(mask, (width - mask.shape[1], 0)) for mask in masks])


def _decode(model, cache: Cache, attention_mask: torch.Tensor, position: torch.Tensor,
            logits: torch.Tensor, max_new_tokens: int, eos_token_id: int | None) -> list[list[int]]:
    """Greedy decoding from a prefilled `cache` (`logits`: each row's next-token logits, `position`:
    each row's last position). A row that produced eos stops; the ended rows leave the batch (and
    the cache) once they are a quarter of it, so the batch shrinks without a copy every step."""
    live = torch.arange(logits.shape[0], device=logits.device)  # batch row -> row of the result
    ended = torch.zeros_like(live, dtype=torch.bool)
    answers: list[list[int]] = [[] for _ in range(logits.shape[0])]
    for step in range(max_new_tokens):
        tokens = logits.float().argmax(-1)
        for row, token, done in zip(live.tolist(), tokens.tolist(), ended.tolist()):
            if not done:
                answers[row].append(token)
        if eos_token_id is not None:
            ended |= tokens == eos_token_id
        if step == max_new_tokens - 1 or bool(ended.all()):
            break
        if 4 * int(ended.sum()) >= len(live):
            kept = (~ended).nonzero().squeeze(-1)
            cache.batch_select_indices(kept)
            live, tokens, attention_mask, position, ended = (live[kept], tokens[kept], attention_mask[kept],
                                                             position[kept], ended[kept])
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(live), 1))], dim=-1)
        position = position + 1
        logits = model(input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=position,
                       cache=cache, use_cache=True).logits[:, -1]
    return answers


def _generate(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id) -> list[list[int]]:
    """transformers' own greedy `generate`, new tokens up to eos (the padding after it dropped)."""
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                         do_sample=False, use_cache=True, pad_token_id=pad_token_id, eos_token_id=eos_token_id)
    rows = out[:, input_ids.shape[1]:].tolist()
    return [row[: row.index(eos_token_id) + 1] if eos_token_id in row else row for row in rows]


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    """ROUGE-L F1 per pair (Google's rouge-score, Porter stemming)."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


def personalized_rouge_l(
    model, tokenizer, examples: list[Example], max_examples: int = 16, **generation
) -> float:
    """Mean ROUGE-L F1 of `model` on the first `max_examples` of a client's test split."""
    chosen = examples[:max_examples]
    if not chosen:
        return float("nan")
    predictions = generate_responses(model, tokenizer, chosen, **generation)
    scores = rouge_l(predictions, [e.response for e in chosen])
    return sum(scores) / len(scores)

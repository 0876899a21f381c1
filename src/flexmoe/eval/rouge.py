"""Personalised ROUGE-L: greedy generation on a client's test split, scored with rouge-score.

Generation is batched (left padding) and uses the KV cache; `max_examples` and
`max_new_tokens` keep the evaluation small by default.
"""

from __future__ import annotations

import torch
from rouge_score import rouge_scorer

from flexmoe.data import Example, format_prompt


def generate_responses(
    model, tokenizer, examples: list[Example], template: str = "alpaca",
    max_new_tokens: int = 32, batch_size: int = 8, max_prompt_length: int = 256,
) -> list[str]:
    """Greedy completions of each example's prompt (the prompt itself stripped)."""
    prompts = [format_prompt(e, template=template, tokenizer=tokenizer) for e in examples]
    outputs: list[str] = []
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # so every prompt ends where generation starts
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(
                prompts[start : start + batch_size], return_tensors="pt", padding=True,
                truncation=True, max_length=max_prompt_length,
            )
            enc = {name: tensor.to(device) for name, tensor in enc.items()}  # onto the model's device
            with torch.no_grad():
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                )
            new_tokens = out[:, enc["input_ids"].shape[1] :]
            outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return [text.strip() for text in outputs]


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

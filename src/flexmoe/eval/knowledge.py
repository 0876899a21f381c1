"""World-knowledge measures of a causal LM: held-out corpus loss and multiple-choice probes.

Texts are scored the way the tiny base was pretrained: `bos + text + eos` (a tokenizer without
a bos or eos token simply skips it). The loss is the mean negative log-likelihood per predicted
token, in nats, so exp(loss) is the perplexity.

Probe options are scored by the log-likelihood of the option as a continuation of the question.
Options differ in length, and a plain sum favours short options, so the default normalisation
divides the sum by the option's length in UTF-8 bytes (lm-evaluation-harness's `acc_norm`): it
does not depend on the tokenizer, which keeps scores comparable across base models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flexmoe.models.families import unwrap

NORMALISATIONS = ("bytes", "tokens", "none")


def _with_specials(tokenizer, ids: list[int]) -> list[int]:
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    tail = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return head + ids + tail


def _pad_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def _padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of the rows, right-padded to the longest."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
    return input_ids, attention


def _token_logprobs(model, rows: list[list[int]], pad_id: int, routing=None) -> list[torch.Tensor]:
    """log p(row[t] | row[:t]) for t >= 1, one tensor per row (right padding, masked). With a
    `RoutingCounter`, its router hooks count the rows' tokens (padding left out) on the way."""
    input_ids, attention = _padded(rows, pad_id)
    device = next(model.parameters()).device
    if routing is not None:
        routing.attention_mask = attention
    try:
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float()
    finally:
        if routing is not None:
            routing.attention_mask = None
    logprobs = F.log_softmax(logits[:, :-1], dim=-1)
    picked = logprobs.gather(-1, input_ids[:, 1:, None].to(device)).squeeze(-1).cpu()
    return [picked[i, : len(row) - 1] for i, row in enumerate(rows)]


def _tail_logprobs(model, rows: list[list[int]], tails: list[int], pad_id: int) -> list[torch.Tensor]:
    """log p(row[t] | row[:t]) for the last `tails[i]` tokens of each row only: the LM head and
    the softmax run on those positions alone (most of a probe row is its question)."""
    input_ids, attention = _padded(rows, pad_id)
    device = next(model.parameters()).device
    lm = unwrap(model)
    hidden = lm.get_decoder()(input_ids=input_ids.to(device), attention_mask=attention.to(device)).last_hidden_state
    row_index = torch.tensor([i for i, tail in enumerate(tails) for _ in range(tail)], dtype=torch.long)
    # the hidden state at t - 1 predicts token t
    targets = torch.tensor([t for row, tail in zip(rows, tails) for t in range(len(row) - tail, len(row))],
                           dtype=torch.long)
    logits = lm.get_output_embeddings()(hidden[row_index.to(device), (targets - 1).to(device)]).float()
    logprobs = F.log_softmax(logits, dim=-1)
    picked = logprobs.gather(-1, input_ids[row_index, targets][:, None].to(device)).squeeze(-1).cpu()
    return list(picked.split(tails))


@torch.no_grad()
def heldout_loss(model, tokenizer, texts: list[str], max_length: int = 256, batch_size: int = 16) -> float:
    """Mean token NLL (nats) of `texts`, each scored alone as bos + text + eos, cut to max_length."""
    return pooled_loss(document_nll(model, tokenizer, texts, max_length, batch_size))


def pooled_loss(per_document: list[tuple[float, int]]) -> float:
    """Mean token NLL over documents given as (summed NLL, tokens), summed in length order (as
    the documents were batched), so the value does not depend on the documents' order."""
    scored = sorted((d for d in per_document if d[1] > 0), key=lambda d: d[1])
    if not scored:
        raise ValueError("heldout_loss needs at least one text of two or more tokens")
    return sum(nll for nll, _ in scored) / sum(count for _, count in scored)


@torch.no_grad()
def document_nll(model, tokenizer, texts: list[str], max_length: int = 256,
                 batch_size: int = 16, routing=None) -> list[tuple[float, int]]:
    """(summed NLL in nats, predicted tokens) of each text, in the order given; a text of fewer
    than two tokens gets (0.0, 0). Similar lengths share a batch. A `RoutingCounter` given as
    `routing` counts the scored tokens' expert choices in the same pass."""
    rows = [_with_specials(tokenizer, ids)[:max_length]
            for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    order = sorted((i for i, row in enumerate(rows) if len(row) >= 2), key=lambda i: len(rows[i]))
    out = [(0.0, 0)] * len(rows)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        for i, logprobs in zip(batch, _token_logprobs(model, [rows[i] for i in batch], _pad_id(tokenizer), routing)):
            out[i] = (-float(logprobs.sum()), logprobs.numel())
    return out


def continuation_ids(tokenizer, question: str, option: str) -> tuple[list[int], list[int]]:
    """Token ids of the context (bos + question) and of the option that continues it.

    The separating space belongs to the option (" option"), as it does in running text with
    a byte-level BPE, so the option's first token is the one the model saw in pretraining.
    """
    context = question.rstrip()
    gap = question[len(context):] or " "
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    context_ids = head + tokenizer(context, add_special_tokens=False)["input_ids"]
    option_ids = tokenizer(gap + option.strip(), add_special_tokens=False)["input_ids"]
    return context_ids, option_ids


@torch.no_grad()
def option_loglikelihoods(model, tokenizer, question: str, options: list[str]) -> list[tuple[float, int]]:
    """(summed log-likelihood, token count) of each option as the continuation of the question."""
    return probes_loglikelihoods(model, tokenizer, [(question, options)])[0]


@torch.no_grad()
def probes_loglikelihoods(model, tokenizer, questions: list[tuple[str, list[str]]],
                          batch_size: int = 32) -> list[list[tuple[float, int]]]:
    """`option_loglikelihoods` of many (question, options), their rows batched by length."""
    pairs = [(q, continuation_ids(tokenizer, question, option))
             for q, (question, options) in enumerate(questions) for option in options]
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][1][0]) + len(pairs[i][1][1]))
    scored: dict[int, tuple[float, int]] = {}
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        rows = [pairs[i][1][0] + pairs[i][1][1] for i in batch]
        tails = [len(pairs[i][1][1]) for i in batch]  # the option's tokens end each row
        for i, tail, logprobs in zip(batch, tails, _tail_logprobs(model, rows, tails, _pad_id(tokenizer))):
            scored[i] = (float(logprobs.sum()), tail)
    out: list[list[tuple[float, int]]] = [[] for _ in questions]
    for i, (q, _) in enumerate(pairs):
        out[q].append(scored[i])
    return out


def normalised_scores(loglikelihoods: list[tuple[float, int]], options: list[str],
                      normalise: str = "bytes") -> list[float]:
    """Divide each summed log-likelihood by the option's length in bytes, tokens, or nothing."""
    if normalise not in NORMALISATIONS:
        raise ValueError(f"normalise must be one of {NORMALISATIONS}, got {normalise!r}")
    lengths = {"bytes": [len(option.strip().encode("utf-8")) for option in options],
               "tokens": [tokens for _, tokens in loglikelihoods],
               "none": [1] * len(options)}[normalise]
    return [total / max(length, 1) for (total, _), length in zip(loglikelihoods, lengths)]


def option_scores(model, tokenizer, question: str, options: list[str], normalise: str = "bytes") -> list[float]:
    """Normalised log-likelihood of each option given the question."""
    return normalised_scores(option_loglikelihoods(model, tokenizer, question, options), options, normalise)


def probe_predictions(model, tokenizer, probes, normalise: str = "bytes") -> list[int]:
    """Index of the best-scoring option for each probe."""
    loglikelihoods = probes_loglikelihoods(model, tokenizer, [(p.question, p.options) for p in probes])
    predictions = []
    for probe, option_lls in zip(probes, loglikelihoods):
        scores = normalised_scores(option_lls, probe.options, normalise)
        predictions.append(max(range(len(scores)), key=scores.__getitem__))
    return predictions


def probe_accuracy(model, tokenizer, probes, normalise: str = "bytes") -> float:
    """Fraction of probes whose correct option has the highest normalised log-likelihood."""
    probes = list(probes)
    if not probes:
        raise ValueError("probe_accuracy needs at least one probe")
    predictions = probe_predictions(model, tokenizer, probes, normalise)
    return sum(int(p == probe.answer) for p, probe in zip(predictions, probes)) / len(probes)

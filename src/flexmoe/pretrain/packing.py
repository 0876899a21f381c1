"""The pretraining data: documents, the BPE tokenizer, documents packed into fixed-length
sequences (by domain, for router supervision), and the batch of each step as a pure function of
(seed, step)."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch

from flexmoe.errors import FlexmoeError
from flexmoe.pretrain.config import BOS, EOS, MIXED, PAD, SPECIAL_TOKENS, TokenizerSettings, TrainSettings


# "dog (noun, animal): ..." -> noun.animal ; "happy (adjective): ..." -> adjective
_DOMAIN = re.compile(r"^[^()]*\((\w+)(?:, (\w+))?[^)]*\):")


def read_documents(source: str, split: str) -> list[str]:
    """Documents of `source`: the builtin WordNet corpus split, or one document per line of a file."""
    if source == "builtin":
        from flexmoe.data import builtin_corpus
        return builtin_corpus(split)
    path = Path(source)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise FlexmoeError(f"cannot read corpus file {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise FlexmoeError(f"corpus file {path} is not UTF-8 text") from None
    documents = [line.strip() for line in lines if line.strip()]
    if not documents:
        raise FlexmoeError(f"corpus file {path} has no documents (one per line expected)")
    return documents


def train_tokenizer(documents: list[str], settings: TokenizerSettings):
    """Byte-level BPE trained on `documents`, wrapped as a Hugging Face fast tokenizer.

    Byte-level means any text encodes without an unknown token. Encoding prepends <|bos|>, as
    every pretraining document starts with it, so prompts in fine-tuning, evaluation and
    generation look like the text the model learned; code that builds sequences itself (packing,
    scoring) passes `add_special_tokens=False`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=settings.vocab_size, min_frequency=settings.min_frequency,
        special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False)
    tokenizer.train_from_iterator(documents, trainer=trainer)
    bos = (BOS, tokenizer.token_to_id(BOS))
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                             special_tokens=[bos])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, model_max_length=1 << 30)


def pack_documents(documents: list[str], tokenizer, seq_len: int, seed: int) -> torch.Tensor:
    """Shuffle documents (seeded), encode each as bos + text + eos, cut the stream into rows."""
    order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(seed)).tolist()
    encoded = tokenizer([documents[i] for i in order], add_special_tokens=False)["input_ids"]
    stream = [token for ids in encoded for token in (tokenizer.bos_token_id, *ids, tokenizer.eos_token_id)]
    rows = len(stream) // seq_len
    if rows == 0:
        raise FlexmoeError(f"the corpus has {len(stream)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(stream[: rows * seq_len], dtype=torch.long).view(rows, seq_len)


def document_domain(text: str) -> str:
    """The WordNet part of speech and lexicographer file a corpus document starts with."""
    match = _DOMAIN.match(text)
    if not match:
        return "other"
    return f"{match.group(1)}.{match.group(2)}" if match.group(2) else match.group(1)


def pack_by_domain(documents: list[str], tokenizer, seq_len: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Pack each domain's documents into sequences of their own -> (rows, the domain of each row).

    A domain's last, incomplete sequence is not padded: the tails of all domains are packed
    together into sequences of the group `MIXED`, so no document is lost (but the last tail).
    """
    groups: dict[str, list[str]] = {}
    for doc in documents:
        groups.setdefault(document_domain(doc), []).append(doc)
    rows, names, tails = [], [], []
    for index, domain in enumerate(sorted(groups)):
        stream = _token_stream(groups[domain], tokenizer, seed + index)
        full = len(stream) // seq_len * seq_len
        rows += [stream[start:start + seq_len] for start in range(0, full, seq_len)]
        names += [domain] * (full // seq_len)
        tails += stream[full:]
    rows += [tails[start:start + seq_len] for start in range(0, len(tails) // seq_len * seq_len, seq_len)]
    names += [MIXED] * (len(rows) - len(names))
    if not rows:
        raise FlexmoeError(f"the corpus has {len(tails)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(rows, dtype=torch.long), names


def _token_stream(documents: list[str], tokenizer, seed: int) -> list[int]:
    """Documents in a seeded order, each as bos + text + eos, back to back."""
    order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(seed)).tolist()
    encoded = tokenizer([documents[i] for i in order], add_special_tokens=False)["input_ids"]
    return [token for ids in encoded for token in (tokenizer.bos_token_id, *ids, tokenizer.eos_token_id)]


def domain_batch_at(row_domains: list[str], step: int, batch_size: int, seed: int) -> list[int]:
    """Row indices of step `step` when every batch comes from one domain; a pure function of step.

    Each epoch shuffles every domain's rows and cuts them into batches; the rows left over
    (fewer than a batch per domain) form mixed batches of their own; then the batches are shuffled.
    """
    plan = _domain_epoch_plan(tuple(row_domains), batch_size, seed, epoch=0)
    epoch, index = divmod(step, len(plan))
    return _domain_epoch_plan(tuple(row_domains), batch_size, seed, epoch)[index]


@functools.lru_cache(maxsize=4)
def _domain_epoch_plan(row_domains: tuple[str, ...], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch + 1)
    by_domain: dict[str, list[int]] = {}
    for index, domain in enumerate(row_domains):
        by_domain.setdefault(domain, []).append(index)
    batches, leftovers = [], []
    for domain in sorted(by_domain):
        indices = by_domain[domain]
        shuffled = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
        full = len(shuffled) // batch_size * batch_size
        batches += [shuffled[start:start + batch_size] for start in range(0, full, batch_size)]
        leftovers += shuffled[full:]
    leftovers = [leftovers[i] for i in torch.randperm(len(leftovers), generator=generator).tolist()]
    batches += [leftovers[start:start + batch_size]
                for start in range(0, len(leftovers) // batch_size * batch_size, batch_size)]
    if not batches:
        raise FlexmoeError(f"the corpus has {len(row_domains)} sequences, fewer than one batch of {batch_size}")
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def training_batches(documents: list[str], tokenizer, settings: TrainSettings, seed: int):
    """(rows, row_domains, picks_for_step) for the configured domain grouping.

    picks_for_step(step) -> the row indices of that step's batch (a pure function of step);
    row_domains is None when documents are not grouped by domain.
    """
    if settings.domain_grouping == "none":
        rows = pack_documents(documents, tokenizer, settings.seq_len, seed)
        return rows, None, lambda step: batch_picks(rows.shape[0], step, settings.batch_size, seed)
    rows, row_domains = pack_by_domain(documents, tokenizer, settings.seq_len, seed)
    if settings.domain_grouping == "sequences":
        return rows, row_domains, lambda step: batch_picks(rows.shape[0], step, settings.batch_size, seed)
    return rows, row_domains, lambda step: torch.tensor(domain_batch_at(row_domains, step, settings.batch_size, seed))


def assign_domain_experts(row_domains: list[str], num_experts: int) -> dict[str, int]:
    """Each domain's supervision expert: largest domains first, each to the least-filled expert.

    So the `num_experts` largest domains get distinct experts, and the expert loads stay balanced
    in rows. The `MIXED` rows (tails of several domains) get none.
    """
    counts: dict[str, int] = {}
    for domain in row_domains:
        if domain != MIXED:
            counts[domain] = counts.get(domain, 0) + 1
    fill = [0] * num_experts
    mapping = {}
    for domain in sorted(counts, key=lambda d: (-counts[d], d)):
        expert = min(range(num_experts), key=lambda e: (fill[e], e))
        mapping[domain] = expert
        fill[expert] += counts[domain]
    return mapping


def row_targets(row_domains: list[str], mapping: dict[str, int]) -> torch.Tensor:
    """The supervision expert of each row (-1 = no supervision)."""
    return torch.tensor([mapping.get(domain, -1) for domain in row_domains], dtype=torch.long)


def batch_picks(n: int, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """Row indices for optimiser step `step`: epoch-wise seeded permutations, a pure function of step."""
    picks = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, index = divmod(position, n)
        picks.append(_epoch_order(n, seed, epoch)[index])
    return torch.tensor(picks)


_ORDER_CACHE: dict[tuple[int, int, int], list[int]] = {}


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    key = (n, seed, epoch)
    if key not in _ORDER_CACHE:
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch + 1)
        _ORDER_CACHE[key] = torch.randperm(n, generator=generator).tolist()
    return _ORDER_CACHE[key]

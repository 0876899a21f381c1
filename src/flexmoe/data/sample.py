"""Seeded samples of examples, stratified by category (else domain) where the data has labels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flexmoe.data.example import Example


def stratify_field(examples: Sequence[Example]) -> str | None:
    """"category" when any example has one, else "domain" when any has one, else None."""
    return next((by for by in ("category", "domain") if any(getattr(e, by) for e in examples)), None)


def stratified_sample(examples: Sequence[Example], size: int, seed: int = 0) -> list[Example]:
    """`size` examples (all when fewer), in file order: each label's share proportional to its
    size (largest remainders, ties by label), drawn at random within it (unlabelled rows are a group)."""
    if size >= len(examples):
        return list(examples)
    rng = np.random.default_rng(seed)
    by = stratify_field(examples)
    groups: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        groups.setdefault(getattr(example, by) if by else "", []).append(index)
    names = sorted(groups)
    exact = [size * len(groups[name]) / len(examples) for name in names]
    counts = [int(share) for share in exact]
    for position in sorted(range(len(names)), key=lambda i: (counts[i] - exact[i], names[i]))[: size - sum(counts)]:
        counts[position] += 1
    chosen = [index for name, count in zip(names, counts) for index in rng.permutation(groups[name])[:count]]
    return [examples[index] for index in sorted(chosen)]

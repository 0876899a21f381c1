"""Samples of a client's data, fixed by the seed: the evaluation sample of its test split
(stratified over categories) and the capped training set (`data.max_train_per_client`).

Every method of a given seed partitions the data the same way and draws the same samples, so
scores are paired example by example across methods (and with the base model).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flexmoe.data.example import Example


def derived_seed(*parts: int) -> int:
    """One seed from several (run seed, round, client, a purpose tag): every random choice of a run
    derives from its seed this way, so each is a function of those parts alone."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def stratify_field(examples: Sequence[Example]) -> str | None:
    """"category" when any example has one, else "domain" when any has one, else None."""
    return next((by for by in ("category", "domain") if any(getattr(e, by) for e in examples)), None)


def stratified_sample(examples: Sequence[Example], size: int, seed: int) -> list[Example]:
    """Up to `size` examples balanced over the labels (`stratify_field`: category, else domain;
    unlabelled rows form one group): labels take turns (in name order), each giving its next
    example in a seeded random order, until `size` are chosen or all are used. A label with fewer
    examples than its share is used up and the others fill the rest. The sample keeps the input's
    order, so the same examples always come in the same order."""
    if size >= len(examples):
        return list(examples)
    rng = np.random.default_rng(seed)
    by = stratify_field(examples)
    groups: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        groups.setdefault(getattr(example, by) if by else "", []).append(index)
    queues = [[members[i] for i in rng.permutation(len(members))] for _, members in sorted(groups.items())]
    chosen: list[int] = []
    turn = 0
    while len(chosen) < size:
        queue = queues[turn % len(queues)]
        if queue:
            chosen.append(queue.pop(0))
        turn += 1
    return [examples[i] for i in sorted(chosen)]


def capped(examples: Sequence[Example], limit: int, seed: int) -> list[Example]:
    """At most `limit` examples (0 = all): a seeded uniform subset in the split's order. Not the
    first `limit`: a client's share is grouped by label, so its head would hold only its first
    domains or categories."""
    if not limit or limit >= len(examples):
        return list(examples)
    keep = np.random.default_rng(seed).choice(len(examples), size=limit, replace=False)
    return [examples[i] for i in sorted(keep)]

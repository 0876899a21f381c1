"""Partitioning: every scheme covers the data exactly once, is deterministic, and is as skewed as claimed."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from flexmoe.data import Example, partition, partition_stats
from flexmoe.errors import FlexmoeError

DOMAINS = ["animal", "food", "body", "plant", "motion", "music"]
CATEGORIES = ["define", "synonyms", "antonym"]


def make_examples(per_domain=30):
    return [
        Example(instruction=f"q {domain} {i}", response=f"a {i}", domain=domain,
                category=CATEGORIES[i % len(CATEGORIES)], id=f"{domain}-{i}")
        for domain in DOMAINS for i in range(per_domain)
    ]


def all_ids(parts):
    return [e.id for part in parts for e in part.train + part.test]


@pytest.mark.parametrize("scheme", ["iid", "pathological", "dirichlet", "quantity"])
def test_every_example_lands_on_exactly_one_client(scheme):
    examples = make_examples()
    parts = partition(examples, num_clients=4, scheme=scheme, alpha=5.0, seed=1)
    ids = all_ids(parts)
    assert len(ids) == len(set(ids))
    assert len(ids) == len(examples)  # pathological too: 6 domains on 4 clients x 1, none dropped
    assert [part.client_id for part in parts] == [0, 1, 2, 3]


@pytest.mark.parametrize("scheme", ["iid", "pathological", "dirichlet", "quantity"])
def test_same_seed_same_partition_other_seed_differs(scheme):
    examples = make_examples()
    first = partition(examples, 3, scheme=scheme, seed=7)
    assert partition(examples, 3, scheme=scheme, seed=7) == first
    assert partition(examples, 3, scheme=scheme, seed=8) != first


def test_iid_sizes_are_balanced():
    parts = partition(make_examples(), 7, scheme="iid", test_fraction=0.0)
    sizes = [len(p.train) for p in parts]
    assert sum(sizes) == 180 and max(sizes) - min(sizes) <= 1


def test_pathological_gives_whole_domains():
    examples = make_examples()
    parts = partition(examples, 3, scheme="pathological", per_client=2, seed=0)
    held = [set(e.domain for e in p.train + p.test) for p in parts]
    assert all(len(domains) == 2 for domains in held)
    assert set().union(*held) == set(DOMAINS)  # 3 clients x 2 = 6 domains, each held once
    for domains, part in zip(held, parts):
        assert len(part.train) + len(part.test) == 30 * len(domains)  # whole domains


def test_pathological_shares_a_label_when_slots_exceed_labels():
    parts = partition(make_examples(), 4, scheme="pathological", by="category", per_client=1, seed=0)
    held = [Counter(e.category for e in p.train + p.test) for p in parts]
    assert all(len(c) == 1 for c in held)
    shared = Counter(next(iter(c)) for c in held)
    assert sorted(shared.values()) == [1, 1, 2]
    label = next(name for name, n in shared.items() if n == 2)
    sizes = [c[label] for c in held if label in c]
    assert sum(sizes) == 60 and abs(sizes[0] - sizes[1]) <= 1  # a shared label is split evenly


def test_dirichlet_small_alpha_is_more_skewed_than_large():
    examples = make_examples(per_domain=200)

    def mean_max_share(alpha):
        parts = partition(examples, 5, scheme="dirichlet", alpha=alpha, seed=3, test_fraction=0)
        shares = [max(Counter(e.domain for e in p.train).values()) / len(p.train) for p in parts]
        return float(np.mean(shares))

    assert mean_max_share(0.1) > 0.45 > mean_max_share(100.0)
    assert mean_max_share(100.0) < 0.3  # near-uniform over 6 domains (1/6 ≈ 0.17)


def test_quantity_skew_changes_sizes_not_mix():
    examples = make_examples(per_domain=200)
    parts = partition(examples, 4, scheme="quantity", alpha=0.5, seed=0, test_fraction=0)
    sizes = sorted(len(p.train) for p in parts)
    assert sum(sizes) == len(examples) and sizes[-1] > 2 * sizes[0]


def test_quantity_skew_never_leaves_a_client_empty():
    for seed in range(20):
        parts = partition(make_examples(per_domain=2), 8, scheme="quantity", alpha=0.05, seed=seed, test_fraction=0)
        assert all(part.train for part in parts) and sum(len(p.train) for p in parts) == 12


def test_per_client_test_split():
    parts = partition(make_examples(), 3, scheme="iid", test_fraction=0.25, seed=0)
    for part in parts:
        assert len(part.test) == round(60 * 0.25)
        assert not {e.id for e in part.test} & {e.id for e in part.train}


def test_labels_restrict_and_unknown_label_lists_valid_ones():
    parts = partition(make_examples(), 2, scheme="iid", labels=["food", "music"])
    assert {e.domain for e in parts[0].train + parts[1].train} == {"food", "music"}
    with pytest.raises(FlexmoeError, match="unknown domain 'space'; valid: animal, body, food, motion, music, plant"):
        partition(make_examples(), 2, labels=["space"])


def test_label_split_of_unlabelled_data_is_refused():
    unlabelled = [Example(instruction=f"q{i}", response="a") for i in range(10)]
    with pytest.raises(FlexmoeError, match="the examples have no domain labels"):
        partition(unlabelled, 2, scheme="pathological")
    assert len(partition(unlabelled, 2, scheme="iid")) == 2


def test_client_without_examples_is_named():
    with pytest.raises(FlexmoeError, match="client 3 has no examples: fewer examples than the 4 clients"):
        partition(make_examples()[:3], 4, scheme="iid")
    with pytest.raises(FlexmoeError, match=r"client \d+ has no examples: dirichlet sampling with alpha=0.001"):
        partition(make_examples(per_domain=2), 10, scheme="dirichlet", alpha=0.001, seed=0)


@pytest.mark.parametrize("kwargs, message", [
    ({"scheme": "random"}, "unknown partition scheme 'random'"),
    ({"by": "topic"}, "cannot partition by 'topic'"),
    ({"per_client": 9}, "per_client=9 but the data has only 6 domain values"),
    ({"alpha": 0.0}, "alpha must be positive"),
    ({"test_fraction": 1.0}, "test_fraction must be in"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(FlexmoeError, match=message):
        partition(make_examples(), 2, **kwargs)


def test_partition_stats_counts():
    parts = partition(make_examples(), 3, scheme="pathological", per_client=2, seed=0, test_fraction=0.1)
    stats = partition_stats(parts)
    assert stats["num_clients"] == 3
    assert stats["train"] + stats["test"] == 180
    for client, part in zip(stats["clients"], parts):
        assert client["train"] == len(part.train) and client["test"] == len(part.test)
        assert sum(client["domains"].values()) == len(part.train) + len(part.test)
        assert client["categories"] == dict(sorted(Counter(e.category for e in part.train + part.test).items()))


# ---- no row is lost without saying so ----------------------------------------------------------
DOLLY_CATEGORIES = ["open_qa", "general_qa", "classification", "closed_qa", "brainstorming",
                    "information_extraction", "summarization", "creative_writing"]


def dolly_shaped(rows_per_category=(40, 35, 30, 25, 20, 15, 12, 10), uncategorised=3):
    examples = [Example(instruction=f"q {name} {i}", response=f"a {i}", category=name, id=f"{name}-{i}")
                for name, count in zip(DOLLY_CATEGORIES, rows_per_category) for i in range(count)]
    return examples + [Example(instruction=f"q none {i}", response="a", id=f"none-{i}") for i in range(uncategorised)]


def test_more_categories_than_clients_keeps_every_row():
    examples = dolly_shaped()
    parts = partition(examples, 4, scheme="pathological", by="category", seed=0)
    ids = all_ids(parts)
    assert sorted(ids) == sorted(e.id for e in examples)  # every row, once
    held = [{e.category for e in p.train + p.test if e.category} for p in parts]
    assert set().union(*held) == set(DOLLY_CATEGORIES)
    for index, categories in enumerate(held):  # each category stays whole, on one client
        assert not any(categories & other for other in held[index + 1:])
    assert partition(examples, 4, scheme="pathological", by="category", seed=0) == parts
    stats = partition_stats(parts, total=len(examples))
    assert stats["rows"] == stats["total_rows"] == len(examples)


def test_rows_without_the_label_are_dealt_round_robin():
    examples = dolly_shaped(rows_per_category=(30, 30, 30, 30), uncategorised=6)
    parts = partition(examples, 4, scheme="pathological", by="category", seed=2)
    unlabelled = [sum(1 for e in p.train + p.test if not e.category) for p in parts]
    assert sorted(unlabelled) == [1, 1, 2, 2]
    # the unlabelled rows take no client's slot: each client still holds one whole category
    assert [len({e.category for e in p.train + p.test if e.category}) for p in parts] == [1, 1, 1, 1]
    # and they leave the clients' categories as they are without them
    labelled = partition(examples[:120], 4, scheme="pathological", by="category", seed=2)
    assert [{e.category for e in p.train + p.test if e.category} for p in parts] == \
        [{e.category for e in p.train + p.test} for p in labelled]


def test_dirichlet_deals_unlabelled_rows_too():
    examples = dolly_shaped(uncategorised=8)
    parts = partition(examples, 4, scheme="dirichlet", by="category", alpha=1.0, seed=0)
    assert sorted(all_ids(parts)) == sorted(e.id for e in examples)
    assert [sum(1 for e in p.train + p.test if not e.category) for p in parts] == [2, 2, 2, 2]


def test_leftover_groups_drop_keeps_the_old_split_and_counts_it():
    examples = dolly_shaped(uncategorised=0)
    parts = partition(examples, 4, scheme="pathological", by="category", seed=0, leftover="drop")
    held = [{e.category for e in p.train + p.test} for p in parts]
    assert all(len(categories) == 1 for categories in held)
    stats = partition_stats(parts, total=len(examples))
    assert stats["rows"] < stats["total_rows"] == len(examples)
    with pytest.raises(FlexmoeError, match="unknown leftover"):
        partition(examples, 4, leftover="keep")

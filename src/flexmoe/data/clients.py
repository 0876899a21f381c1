"""The run's clients' data: the partition every engine and client derives the same way from the
config, and each client's tokenized training features."""

from __future__ import annotations

from dataclasses import dataclass, replace

from flexmoe.config import RunConfig
from flexmoe.data.partition import partition
from flexmoe.data.persona import apply_personas
from flexmoe.data.sample import capped, derived_seed
from flexmoe.data.source import configured_examples, log_partition
from flexmoe.data.tokens import Truncation, training_features
from flexmoe.errors import FlexmoeError


@dataclass
class Client:
    client_id: int
    train: list
    test: list
    features: list[dict]
    truncation: object = None  # flexmoe.data.tokens.Truncation of `features`, for the report
    skipped: tuple[str, ...] = ()  # invalid rows of its data file, left out (data.skip_invalid)


@dataclass(frozen=True)
class ClientInfo:
    """What the server's report shows of a client (no examples: they stay on the client)."""

    client_id: int
    domains: tuple[str, ...]
    num_train: int
    num_test: int
    categories: tuple[str, ...] = ()
    truncated: int = 0
    unusable: int = 0
    skipped: tuple[str, ...] = ()  # one message per invalid row of its data file left out


def describe(client: Client) -> ClientInfo:
    """What the report shows of a client: the groups of its share of the partition (its test split
    included), its sizes and its truncation counts."""
    truncation = client.truncation or Truncation()
    examples = client.train + client.test
    return ClientInfo(
        client.client_id, domains=tuple(sorted({e.domain for e in examples if e.domain})),
        num_train=len(client.train), num_test=len(client.test),
        categories=tuple(sorted({e.category for e in examples if e.category})),
        truncated=truncation.truncated, unusable=truncation.unusable, skipped=tuple(client.skipped),
    )


MAX_SKIPPED_KEPT = 1000  # invalid rows a run's records list (the count is always exact)


def skipped_rows(infos: list[ClientInfo]) -> dict:
    """The round-0 record's account of the invalid rows left out (data.skip_invalid): how many, and
    each one's message (file, line, why), every file's rows once however many clients read it."""
    rows = list(dict.fromkeys(row for info in infos for row in info.skipped))
    return {"skipped_rows": len(rows), "skipped_row_errors": rows[:MAX_SKIPPED_KEPT]} if rows else {}


def partition_data(config: RunConfig):
    """The run's data split into `num_clients` parts (every engine and client derives the same)."""
    data = config.data
    examples, skipped = configured_examples(data)
    parts = partition(
        examples, config.num_clients, scheme=data.partition, by=data.by, per_client=data.per_client,
        alpha=data.alpha, seed=config.seed, test_fraction=data.test_fraction, leftover=data.leftover_groups,
    )
    if data.persona:  # each client's answers in its own convention (data/persona.py)
        parts = apply_personas(parts, config.seed)
    parts = [replace(part, skipped=tuple(skipped)) for part in parts]
    log_partition(parts, len(examples), data.by)
    for part in parts:
        if not part.train:
            raise FlexmoeError(
                f"client {part.client_id} got no training examples (data.partition = {data.partition!r}, "
                f"num_clients = {config.num_clients}); use fewer clients or another partition"
            )
    return parts


def capped_train(config: RunConfig, part) -> list:
    """The client's training examples under `data.max_train_per_client` (a seeded subset)."""
    return capped(part.train, config.data.max_train_per_client, derived_seed(config.seed, part.client_id, 0xCA9))


def make_client(config: RunConfig, part, tokenizer) -> Client:
    train = capped_train(config, part)
    features, truncation = training_features(train, tokenizer, config.train.max_length, config.data.template,
                                             part.client_id)
    return Client(part.client_id, train, part.test, features, truncation, part.skipped)

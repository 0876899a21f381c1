"""The run's clients' data: the partition every engine and client derives the same way from the
config, and each client's tokenized training features."""

from __future__ import annotations

from dataclasses import dataclass

from flexmoe.config import RunConfig
from flexmoe.data.builtin import builtin_examples
from flexmoe.data.formats import load_examples
from flexmoe.data.partition import partition
from flexmoe.data.tokens import tokenize_examples
from flexmoe.errors import FlexmoeError


@dataclass
class Client:
    client_id: int
    train: list
    test: list
    features: list[dict]


@dataclass(frozen=True)
class ClientInfo:
    """What the server's report shows of a client (no examples: they stay on the client)."""

    client_id: int
    domains: tuple[str, ...]
    num_train: int
    num_test: int


def describe(client_id: int, train: list, test: list) -> ClientInfo:
    domains = tuple(sorted({e.domain for e in train if e.domain}))
    return ClientInfo(client_id, domains, len(train), len(test))


def partition_data(config: RunConfig):
    """The run's data split into `num_clients` parts (every engine and client derives the same)."""
    data = config.data
    if data.source == "builtin":
        examples = builtin_examples()
    else:
        examples = load_examples(data.source, format=None if data.format == "auto" else data.format)
    parts = partition(
        examples, config.num_clients, scheme=data.partition, by=data.by, per_client=data.per_client,
        alpha=data.alpha, seed=config.seed, test_fraction=data.test_fraction,
    )
    for part in parts:
        if not part.train:
            raise FlexmoeError(
                f"client {part.client_id} got no training examples (data.partition = {data.partition!r}, "
                f"num_clients = {config.num_clients}); use fewer clients or another partition"
            )
    return parts


def make_client(config: RunConfig, part, tokenizer) -> Client:
    train = part.train[: config.data.max_train_per_client or None]
    features = tokenize_examples(train, tokenizer, max_length=config.train.max_length, template=config.data.template)
    return Client(part.client_id, train, part.test, features)

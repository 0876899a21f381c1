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


def own_data(config: RunConfig, examples: list, client_id: int, source: str, skipped=()):
    """A client's own examples (a Flower node's `data-path`, an organisation joining a finished run)
    as its `ClientData`: all of them, split into train/test with `data.test_fraction`, seeded by the run."""
    from flexmoe.data.partition import ClientData

    part = partition(examples, 1, scheme="iid", seed=config.seed, test_fraction=config.data.test_fraction)[0]
    if not part.train:
        raise FlexmoeError(f"{source}: no training examples for client {client_id}")
    return ClientData(client_id, part.train, part.test, tuple(skipped))


def capped_train(config: RunConfig, part) -> list:
    """The client's training examples under `data.max_train_per_client` (a seeded subset)."""
    return capped(part.train, config.data.max_train_per_client, derived_seed(config.seed, part.client_id, 0xCA9))


def make_client(config: RunConfig, part, tokenizer) -> Client:
    train = capped_train(config, part)
    features, truncation = training_features(train, tokenizer, config.train.max_length, config.data.template,
                                             part.client_id)
    return Client(part.client_id, train, part.test, features, truncation, part.skipped)


class ClientPool:
    """The run's clients for one process: the partition (examples only: the data set's size, whatever
    the population) and the tokenised clients it needs. A client is tokenised when first needed and
    kept while it is in the round's set (`start_round`) or `pinned` (the evaluated clients), so memory
    holds the sampled and evaluated clients' features, not the population's; a small run, which
    evaluates every client, keeps them all (nothing is tokenised twice)."""

    def __init__(self, config: RunConfig, parts: list, tokenizer, pinned=()):
        self.config = config
        self.parts = parts
        self.tokenizer = tokenizer
        self.pinned = set(pinned)
        self._kept: dict[int, Client] = {}
        self._current: set[int] = set(self.pinned)
        self._truncation: dict[int, Truncation] = {}  # of every client tokenised so far, for the report

    def __len__(self) -> int:
        return len(self.parts)

    def start_round(self, client_ids) -> None:
        """The clients this round keeps tokenised (with the pinned ones); every other one is dropped."""
        self._current = set(client_ids) | self.pinned
        self._kept = {cid: c for cid, c in self._kept.items() if cid in self._current}

    def get(self, client_id: int) -> Client:
        client = self._kept.get(client_id)
        if client is None:
            client = make_client(self.config, self.parts[client_id], self.tokenizer)
            self._truncation[client_id] = client.truncation
            if client_id in self._current:
                self._kept[client_id] = client
        return client

    def note_truncation(self, client_id: int, truncation: Truncation | None) -> None:
        """A client tokenised in another process (a worker of `runtime.workers`): its truncation
        counts, for the report."""
        if truncation is not None:
            self._truncation[client_id] = truncation

    def infos(self) -> list[ClientInfo]:
        """Every client's report entry (truncation counts: of the clients tokenised in this process)."""
        return [describe(Client(part.client_id, capped_train(self.config, part), part.test, [],
                                self._truncation.get(part.client_id), part.skipped)) for part in self.parts]

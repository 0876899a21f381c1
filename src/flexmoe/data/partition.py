"""Splitting examples across federated clients: IID, pathological, Dirichlet, quantity skew.

Every scheme is deterministic given the examples' order and the seed, and keeps every row:
- more labels than `num_clients * per_client` slots: each label left over goes whole to the
  client holding the fewest examples so far, so some clients hold more labels than per_client
  (`leftover="drop"` leaves them out instead: the caller then reports "N of M rows");
- rows without the label (no category, say) in a pathological or Dirichlet split are shuffled
  and dealt round-robin over all clients, after the labelled rows are split.
Each client's share is then split into its own train and test sets.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flexmoe.data.example import Example
from flexmoe.errors import FlexmoeError

SCHEMES = ("pathological", "iid", "dirichlet", "quantity")
LABEL_FIELDS = ("domain", "category")
LEFTOVER = ("assign", "drop")  # labels beyond num_clients * per_client (pathological)


@dataclass
class ClientData:
    client_id: int
    train: list[Example]
    test: list[Example]
    skipped: tuple[str, ...] = ()  # invalid rows of the file it came from, left out (data.skip_invalid)


def partition(examples: Sequence[Example], num_clients: int, scheme: str = "pathological",
              by: str = "domain", per_client: int = 1, alpha: float = 0.5, seed: int = 0,
              test_fraction: float = 0.1, labels: Sequence[str] | None = None,
              leftover: str = "assign") -> list[ClientData]:
    """Distributes `examples` over `num_clients` clients.

    - iid: a uniform random split into near-equal shares;
    - pathological: each client holds `per_client` whole labels (the `by` field: domain or
      category); a label shared by several clients (more slots than labels) is split evenly;
    - dirichlet: each label's examples are split by proportions ~ Dirichlet(alpha);
    - quantity: random examples, client sizes 1 + Dirichlet(alpha) share of the rest.
    `labels` restricts the data to those domain/category names first.
    """
    _check_arguments(examples, num_clients, scheme, by, per_client, alpha, test_fraction)
    if leftover not in LEFTOVER:
        raise FlexmoeError(f"unknown leftover treatment {leftover!r}; valid: {', '.join(LEFTOVER)}")
    examples = _restrict(examples, by, labels)
    if scheme in ("pathological", "dirichlet") and not any(getattr(example, by) for example in examples):
        raise FlexmoeError(f"the examples have no {by} labels, so a {scheme} split by {by} is impossible; "
                           f"partition by the other label or use scheme iid or quantity")
    rng = np.random.default_rng(seed)
    unlabelled: list[Example] = []
    if scheme in ("pathological", "dirichlet"):
        unlabelled = [example for example in examples if not getattr(example, by)]
        examples = [example for example in examples if getattr(example, by)]
    if scheme == "pathological":
        shares = _pathological(examples, num_clients, by, per_client, rng, leftover == "assign")
    else:
        shares = _SPLITTERS[scheme](examples, num_clients, by, per_client, alpha, rng)
    _deal_round_robin(unlabelled, shares, seed)
    for client_id, share in enumerate(shares):
        if not share:
            raise FlexmoeError(f"client {client_id} has no examples: {_why_empty(scheme, by, alpha, num_clients)}")
    return [_train_test(client_id, share, test_fraction, rng) for client_id, share in enumerate(shares)]


def _check_arguments(examples, num_clients, scheme, by, per_client, alpha, test_fraction) -> None:
    if scheme not in SCHEMES:
        raise FlexmoeError(f"unknown partition scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
    if by not in LABEL_FIELDS:
        raise FlexmoeError(f"cannot partition by {by!r}; valid: {', '.join(LABEL_FIELDS)}")
    if num_clients < 1:
        raise FlexmoeError(f"num_clients must be at least 1, got {num_clients}")
    if per_client < 1:
        raise FlexmoeError(f"per_client must be at least 1, got {per_client}")
    if not alpha > 0:
        raise FlexmoeError(f"alpha must be positive, got {alpha}")
    if not 0 <= test_fraction < 1:
        raise FlexmoeError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if not examples:
        raise FlexmoeError("no examples to partition")


def _restrict(examples: Sequence[Example], by: str, labels: Sequence[str] | None) -> list[Example]:
    if labels is None:
        return list(examples)
    present = sorted({getattr(example, by) for example in examples})
    unknown = [label for label in labels if label not in present]
    if unknown:
        raise FlexmoeError(f"unknown {by} {unknown[0]!r}; valid: {', '.join(present)}")
    wanted = set(labels)
    return [example for example in examples if getattr(example, by) in wanted]


def _why_empty(scheme: str, by: str, alpha: float, num_clients: int) -> str:
    if scheme in ("iid", "quantity"):
        return f"fewer examples than the {num_clients} clients"
    if scheme == "pathological":
        return f"its {by} slot went to a {by} with fewer examples than the clients sharing it"
    return (f"{scheme} sampling with alpha={alpha} gave it a zero share; "
            "raise alpha, lower num_clients or change the seed")


# ---------------------------------------------------------------- schemes


def _iid(examples, num_clients, by, per_client, alpha, rng) -> list[list[Example]]:
    order = rng.permutation(len(examples))
    return [[examples[i] for i in chunk] for chunk in np.array_split(order, num_clients)]


def _pathological(examples, num_clients, by, per_client, rng, assign_leftover: bool) -> list[list[Example]]:
    groups = _groups(examples, by)
    names = sorted(groups)
    if per_client > len(names):
        raise FlexmoeError(f"per_client={per_client} but the data has only {len(names)} {by} values")
    order = [names[i] for i in rng.permutation(len(names))]
    # Client c holds the `per_client` consecutive labels of the shuffled, cyclically repeated list.
    holders: dict[str, list[int]] = {name: [] for name in names}
    for client in range(num_clients):
        for slot in range(client * per_client, (client + 1) * per_client):
            holders[order[slot % len(order)]].append(client)
    shares: list[list[Example]] = [[] for _ in range(num_clients)]
    for name in order:
        if holders[name]:
            members = rng.permutation(len(groups[name]))
            for client, chunk in zip(holders[name], np.array_split(members, len(holders[name]))):
                shares[client].extend(groups[name][i] for i in chunk)
    for name in order[num_clients * per_client:] if assign_leftover else ():  # more labels than slots
        smallest = min(range(num_clients), key=lambda client: len(shares[client]))
        shares[smallest].extend(groups[name][i] for i in rng.permutation(len(groups[name])))
    return shares


def _deal_round_robin(rows: list[Example], shares: list[list[Example]], seed: int) -> None:
    """Rows without a label, shuffled (own seeded stream: the labelled split is unchanged by them)."""
    rng = np.random.default_rng([seed, 1])
    for position, index in enumerate(rng.permutation(len(rows))):
        shares[position % len(shares)].append(rows[index])


def _dirichlet(examples, num_clients, by, per_client, alpha, rng) -> list[list[Example]]:
    groups = _groups(examples, by)
    shares: list[list[Example]] = [[] for _ in range(num_clients)]
    for name in sorted(groups):
        members = rng.permutation(len(groups[name]))
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        for client, chunk in enumerate(_split_by_proportions(members, proportions)):
            shares[client].extend(groups[name][i] for i in chunk)
    return shares


def _quantity(examples, num_clients, by, per_client, alpha, rng) -> list[list[Example]]:
    """Sizes 1 + Dirichlet(alpha) share of the rest: skewed, but no client is left empty."""
    if len(examples) < num_clients:
        return _iid(examples, num_clients, by, per_client, alpha, rng)  # reports the empty client
    order = rng.permutation(len(examples))
    proportions = rng.dirichlet(np.full(num_clients, alpha))
    rest = _split_by_proportions(order[num_clients:], proportions)
    return [[examples[order[client]]] + [examples[i] for i in chunk] for client, chunk in enumerate(rest)]


def _split_by_proportions(items: np.ndarray, proportions: np.ndarray) -> list[np.ndarray]:
    cuts = (np.cumsum(proportions)[:-1] * len(items)).round().astype(int)
    return np.split(items, cuts)


def _groups(examples: Sequence[Example], by: str) -> dict[str, list[Example]]:
    groups: dict[str, list[Example]] = {}
    for example in examples:
        groups.setdefault(getattr(example, by), []).append(example)
    return groups


_SPLITTERS = {"iid": _iid, "dirichlet": _dirichlet, "quantity": _quantity}


def _train_test(client_id: int, share: list[Example], test_fraction: float, rng) -> ClientData:
    """A random per-client test split; at least one test example when asked for and possible."""
    order = rng.permutation(len(share))
    test_size = int(round(len(share) * test_fraction))
    if test_fraction > 0 and len(share) >= 2:
        test_size = min(max(test_size, 1), len(share) - 1)
    test = [share[i] for i in sorted(order[:test_size])]
    train = [share[i] for i in sorted(order[test_size:])]
    return ClientData(client_id=client_id, train=train, test=test)


# ---------------------------------------------------------------- statistics


def partition_stats(parts: Sequence[ClientData], total: int | None = None) -> dict:
    """Per-client sizes and category/domain counts, plus totals (JSON-serialisable).

    `total`: the rows the data had (the M of "N of M rows"); defaults to the rows assigned.
    """
    clients = []
    for part in parts:
        everything = part.train + part.test
        clients.append({
            "client_id": part.client_id,
            "train": len(part.train),
            "test": len(part.test),
            "rows": len(everything),
            "categories": dict(sorted(Counter(e.category for e in everything).items())),
            "domains": dict(sorted(Counter(e.domain for e in everything).items())),
        })
    assigned = sum(client["rows"] for client in clients)
    return {
        "num_clients": len(parts),
        "train": sum(client["train"] for client in clients),
        "test": sum(client["test"] for client in clients),
        "rows": assigned,
        "total_rows": assigned if total is None else total,
        "clients": clients,
    }


def partition_lines(stats: dict, by: str = "domain") -> list[str]:
    """Human-readable "N of M rows" lines: one per client (with its top labels), then the total."""
    total = stats["total_rows"]
    key = "domains" if by == "domain" else "categories"
    lines = []
    for client in stats["clients"]:
        top = ", ".join(f"{name or '(none)'} {count}" for name, count in Counter(client[key]).most_common(3))
        lines.append(f"  client {client['client_id']:>3}: {client['rows']:>6} of {total} rows "
                     f"({client['train']} train / {client['test']} test)  {top}")
    lines.append(f"{stats['num_clients']} clients: {stats['rows']} of {total} rows "
                 f"({stats['train']} train / {stats['test']} test)")
    return lines

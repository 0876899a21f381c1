"""`flexmoe data build | stats | partition`."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from flexmoe.commands.fields import add_field_argument, parse_fields
from flexmoe.errors import FlexmoeError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION")
    build = actions.add_parser("build", help="build the builtin dataset, corpus and probes from WordNet 3.0")
    build.add_argument("--wordnet-dir", required=True, type=Path,
                       help="directory with WordNet's data.noun/verb/adj/adv (e.g. /usr/share/wordnet)")
    build.add_argument("--out", type=Path, default=None,
                       help="output directory (default: the package's shipped assets/wordnet)")

    stats = actions.add_parser("stats", help="count examples per category and domain")
    _add_data_arguments(stats)
    stats.add_argument("--json", action="store_true", help="print one JSON object")

    part = actions.add_parser("partition", help="split a dataset across federated clients")
    _add_data_arguments(part)
    part.add_argument("--num-clients", type=int, required=True)
    part.add_argument("--scheme", default="pathological", help="pathological | iid | dirichlet | quantity")
    part.add_argument("--by", default="domain", help="label for pathological/dirichlet: domain | category")
    part.add_argument("--per-client", type=int, default=1, help="labels per client (pathological)")
    part.add_argument("--leftover-groups", default="assign", choices=("assign", "drop"),
                      help="pathological, more labels than clients x per-client: "
                           "give each to the smallest client, or drop it")
    part.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (dirichlet, quantity)")
    part.add_argument("--seed", type=int, default=0)
    part.add_argument("--test-fraction", type=float, default=0.1)
    part.add_argument("--labels", default=None, help="comma-separated domains/categories to keep")
    part.add_argument("--out", type=Path, default=None,
                      help="write client_<id>/train.jsonl, test.jsonl and partition.json here")
    part.add_argument("--json", action="store_true", help="print the statistics as one JSON object")
    parser.set_defaults(_data_parser=parser)


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=None, help="data file or directory (default: builtin)")
    parser.add_argument("--format", default=None, help="dolly | alpaca | jsonl | json | parquet | hf")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="leave out invalid rows (and say how many) instead of refusing the file")
    add_field_argument(parser)


def run(args: argparse.Namespace) -> int:
    if args.data_command is None:
        args._data_parser.print_help()
        return 2
    return {"build": _build, "stats": _stats, "partition": _partition}[args.data_command](args)


def _build(args) -> int:
    from flexmoe.data.build import build_builtin
    from flexmoe.data.builtin import ASSET_DIR

    for path in build_builtin(args.wordnet_dir, args.out or ASSET_DIR):
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


def _load(args):
    from flexmoe.data import builtin_examples, load_examples

    if args.data is None:
        if args.format or args.field:
            raise FlexmoeError("--format and --field need --data")
        return builtin_examples()
    return load_examples(args.data, args.format, parse_fields(args.field), skip_invalid=args.skip_invalid)


def _stats(args) -> int:
    examples = _load(args)
    summary = {
        "examples": len(examples),
        "categories": dict(sorted(Counter(e.category for e in examples).items())),
        "domains": dict(sorted(Counter(e.domain for e in examples).items())),
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{summary['examples']} examples")
    for heading in ("categories", "domains"):
        print(f"\n{heading} ({len(summary[heading])}):")
        for name, count in summary[heading].items():
            print(f"  {name or '(none)':<24} {count:>7}")
    return 0


def _partition(args) -> int:
    from flexmoe.data import partition, partition_stats
    from flexmoe.data.partition import partition_lines

    labels = [label.strip() for label in args.labels.split(",") if label.strip()] if args.labels else None
    examples = _load(args)
    parts = partition(examples, args.num_clients, scheme=args.scheme, by=args.by,
                      per_client=args.per_client, alpha=args.alpha, seed=args.seed,
                      test_fraction=args.test_fraction, labels=labels, leftover=args.leftover_groups)
    stats = partition_stats(parts, total=len(examples))
    if args.out is not None:
        _write_partition(args.out, parts, stats)
    if args.json:
        print(json.dumps(stats))
        return 0
    print("\n".join(partition_lines(stats, args.by)))
    return 0


def _write_partition(out: Path, parts, stats: dict) -> None:
    from dataclasses import asdict

    from flexmoe.files import write_bytes_atomic

    for part in parts:
        for split in ("train", "test"):
            lines = "".join(json.dumps(asdict(e), ensure_ascii=False) + "\n" for e in getattr(part, split))
            write_bytes_atomic(out / f"client_{part.client_id}" / f"{split}.jsonl", lines.encode("utf-8"))
    write_bytes_atomic(out / "partition.json", (json.dumps(stats, indent=1) + "\n").encode("utf-8"))

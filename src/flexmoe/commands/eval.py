"""`flexmoe eval`: re-evaluate the personalised models of a finished run.

Each client's model is rebuilt from the run directory and scored by the engine's own
evaluation (ROUGE-L and exact match on a stratified sample of `eval.max_test_examples`, plus held-out knowledge
loss and routing statistics when the run's config has them), on its test split from the run's
partition, or on a data file given with --data.
"""

from __future__ import annotations

import argparse
import json

from flexmoe.errors import FlexmoeError

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", metavar="DIR", required=True, help="run directory written by flexmoe run")
    parser.add_argument("--clients", metavar="IDS", help="comma-separated client ids (default: every client)")
    parser.add_argument("--data", metavar="F", help="evaluate on this data file instead of each client's test split")
    parser.add_argument("--format", choices=("dolly", "alpaca", "jsonl", "json", "parquet", "hf"),
                        help="format of --data (default: guessed from the file name)")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="where the clients keep their state (a Flower SuperNode's state-dir; default DIR/clients)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    from flexmoe.engine.restore import check_client, open_run

    checkpoint = open_run(args.run, args.state_dir)
    clients = parse_clients(args.clients, checkpoint.config.num_clients)
    for cid in clients:
        check_client(checkpoint, cid)
    result = evaluate_run(args.run, clients, _load_data(args), args.state_dir)
    print(json.dumps(result, indent=2, sort_keys=True) if args.json else _table(result))
    return 0


def parse_clients(text: str | None, num_clients: int) -> list[int]:
    if text is None:
        return list(range(num_clients))
    try:
        clients = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise FlexmoeError(f"--clients {text!r}: expected comma-separated client ids, e.g. 0,2") from None
    if not clients:
        raise FlexmoeError("--clients names no client")
    return sorted(set(clients))


def _load_data(args: argparse.Namespace):
    if args.data is None:
        return None
    from flexmoe.data import load_examples

    return load_examples(args.data, format=args.format)


def evaluate_run(run_dir, clients: list[int], examples=None, state_dir=None) -> dict:
    """{"round", "data", "clients": [one eval record per client], "mean": {...}} for a run's last checkpoint."""
    import torch

    from flexmoe.engine.core import Client, base_load, eval_means, partition_data
    from flexmoe.engine.restore import restore
    from flexmoe.engine.rundir import MetricsLog

    restored = restore(run_dir, clients[0], state_dir)
    checkpoint, runner = restored.checkpoint, restored.runner
    if examples is None:
        parts = partition_data(checkpoint.config)
        tests = [parts[cid].test for cid in clients]
    else:
        tests = [examples] * len(clients)
    reference = base_load(MetricsLog(checkpoint.run_dir / "metrics.jsonl").read())  # routing drift is from it
    threads = torch.get_num_threads()
    if checkpoint.config.runtime.threads:  # as the run evaluated: same kernels, same numbers
        torch.set_num_threads(checkpoint.config.runtime.threads)
    try:
        records = [runner.evaluate(Client(cid, [], test, []), checkpoint.round, checkpoint.received(), reference)
                   for cid, test in zip(clients, tests)]
    finally:
        torch.set_num_threads(threads)
    return {
        "run": str(checkpoint.run_dir), "method": checkpoint.config.method, "round": checkpoint.round,
        "data": "test splits" if examples is None else f"{len(examples)} examples",
        "clients": records, "mean": eval_means(records),
    }


def _table(result: dict) -> str:
    """The report's per-client evaluation columns, plus the mean over the clients."""
    from flexmoe.report.tables import EVAL_COLUMNS, fmt, table

    columns = [c for c in EVAL_COLUMNS if any(c[0] in r for r in result["clients"])]
    rows = [[str(r["client"]), *(fmt(r.get(key), pattern) for key, _, pattern in columns)] for r in result["clients"]]
    means = result["mean"]
    rows.append(["mean", *(fmt(means.get("rouge_l_avg" if key == "rouge_l" else key), pattern)
                          for key, _, pattern in columns)])
    title = f"{result['method']} run {result['run']}, round {result['round']}, on {result['data']}"
    return "\n".join([title, "", *table(["client", *(name for _, name, _ in columns)], rows)])

"""`flexmoe eval`: re-evaluate the personalised models of a finished run.

Each client's model is rebuilt from the run directory and scored by the engine's own
evaluation (ROUGE-L, exact match and test loss on a stratified sample of up to --max-examples
examples, default the run's `eval.max_test_examples`, plus held-out knowledge loss and routing
statistics when the run's config has them), on its test split from the run's partition, or on a
data file given with --data: a sample of it drawn with the run's seed, stratified by category
(else domain). The table and the JSON say how many examples were really scored.
"""

from __future__ import annotations

import argparse
import json

from flexmoe.commands.fields import add_field_argument
from flexmoe.errors import FlexmoeError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", metavar="DIR", required=True, help="run directory written by flexmoe run")
    parser.add_argument("--clients", metavar="IDS", help="comma-separated client ids (default: every client)")
    parser.add_argument("--data", metavar="F", help="evaluate on this data file instead of each client's test split")
    parser.add_argument("--format", choices=("dolly", "alpaca", "jsonl", "json", "parquet", "hf"),
                        help="format of --data (default: guessed from the file name)")
    add_field_argument(parser)
    parser.add_argument("--max-examples", type=int, metavar="N",
                        help="examples scored per client (default: the run's eval.max_test_examples); with --data "
                             "a seeded sample, stratified by category (else domain)")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="where the clients keep their state (a Flower SuperNode's state-dir; default DIR/clients)")
    parser.add_argument("--device", metavar="D",
                        help="auto, cpu, cuda or cuda:N (default: the run's runtime.device)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    from flexmoe.engine.progress import logs_to, make_progress
    from flexmoe.engine.restore import check_client, open_run

    if args.max_examples is not None and args.max_examples < 1:
        raise FlexmoeError(f"--max-examples must be at least 1, got {args.max_examples}")
    if args.field and not args.data:
        raise FlexmoeError("--field needs --data")
    checkpoint = open_run(args.run, args.state_dir, args.device)
    clients = parse_clients(args.clients, checkpoint.config.num_clients)
    for cid in clients:
        check_client(checkpoint, cid)
    progress = make_progress(quiet=False)
    with logs_to(progress):
        examples = _load_data(args, checkpoint.config.data)
        try:
            result = evaluate_run(args.run, clients, examples, args.state_dir, args.max_examples, progress,
                                      args.device)
        finally:
            progress.close()
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


def _load_data(args: argparse.Namespace, data):
    """--data's examples (None without it); the run's data.fields apply unless --field is given."""
    if args.data is None:
        return None
    from flexmoe.commands.fields import parse_fields
    from flexmoe.data import load_examples

    fields = parse_fields(args.field) or (dict(data.fields) or None)
    return load_examples(args.data, format=args.format, fields=fields, skip_invalid=data.skip_invalid)


def evaluate_run(run_dir, clients: list[int], examples=None, state_dir=None, max_examples: int | None = None,
                 progress=None, device=None) -> dict:
    """{"round", "data", "clients": [one eval record per client], "mean": {...}} for a run's last checkpoint.

    Each record's `examples` is the number of examples it really scored (`max_examples`, default
    the run's eval.max_test_examples, or fewer when the test split is smaller)."""
    from flexmoe.clients import Client, partition_data
    from flexmoe.data.sample import stratified_sample, stratify_field
    from flexmoe.engine.evaluator import base_load
    from flexmoe.engine.model import torch_threads
    from flexmoe.engine.join import joined_test
    from flexmoe.engine.restore import restore
    from flexmoe.report.summary import eval_means
    from flexmoe.rundir import METRICS_FILE, MetricsLog

    restored = restore(run_dir, clients[0], state_dir, device)
    checkpoint, runner = restored.checkpoint, restored.runner
    config = checkpoint.config
    size = max_examples or config.eval.max_test_examples
    runner.evaluator.config = config.model_copy(update={"eval": config.eval.model_copy(update={"max_test_examples": size})})
    if progress is not None:
        runner.progress = progress
    if examples is None:
        parts = partition_data(config) if any(cid < config.num_clients for cid in clients) else []
        tests = [parts[cid].test if cid < config.num_clients else joined_test(config, checkpoint.store, cid)
                 for cid in clients]
        data = "test splits"
    else:
        sample = stratified_sample(examples, size, seed=config.seed)
        tests = [sample] * len(clients)
        by = stratify_field(examples)
        data = (f"{len(sample)} of {len(examples)} examples"
                + (f" (seeded sample, stratified by {by})" if len(sample) < len(examples) and by else
                   " (seeded sample)" if len(sample) < len(examples) else ""))
    reference = base_load(MetricsLog(checkpoint.run_dir / METRICS_FILE).read())  # routing drift is from it
    with torch_threads(config):  # as the run evaluated: same kernels, same numbers
        records = [{**runner.evaluate(Client(cid, [], test, []), checkpoint.round, checkpoint.received(), reference),
                    "examples": min(len(test), size)} for cid, test in zip(clients, tests)]
    return {
        "run": str(checkpoint.run_dir), "method": config.method, "round": checkpoint.round,
        "data": data, "clients": records, "mean": eval_means(records),
    }


def _table(result: dict) -> str:
    """The report's per-client evaluation columns, plus the mean over the clients."""
    from flexmoe.report.tables import EVAL_COLUMNS, fmt, table

    columns = [c for c in EVAL_COLUMNS if any(c[0] in r for r in result["clients"])]
    rows = [[str(r["client"]), str(r["examples"]), *(fmt(r.get(key), pattern) for key, _, pattern in columns)]
            for r in result["clients"]]
    means = result["mean"]
    rows.append(["mean", "", *(fmt(means.get("rouge_l_avg" if key == "rouge_l" else key), pattern)
                          for key, _, pattern in columns)])
    title = f"{result['method']} run {result['run']}, round {result['round']}, on {result['data']}"
    return "\n".join([title, "", *table(["client", "examples", *(name for _, name, _ in columns)], rows)])

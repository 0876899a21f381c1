"""`flexmoe personalize`: a new organisation joins a trained federation.

The run's final shared weights stay as they are; the new client grafts on its own data (methods
that graft), trains its personal part for the run's budget (or what --set says), and is evaluated
against the untouched base and the global model with paired statistics. No server, nothing sent.
Its client directory is then used like any of the run's: `flexmoe generate/eval/export --run RUN
--state-dir OUT --client ID`.
"""

from __future__ import annotations

import argparse

from flexmoe.commands.fields import add_field_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", metavar="DIR", required=True, help="run directory written by flexmoe run")
    parser.add_argument("--data", metavar="FILE", required=True, help="the new organisation's examples (any data format)")
    parser.add_argument("--format", choices=("dolly", "alpaca", "jsonl", "json", "parquet", "hf"),
                        help="format of --data (default: guessed from the file name)")
    add_field_argument(parser)
    parser.add_argument("--out", metavar="DIR",
                        help="state directory for the new client (default: DIR/joined); it gets the next free id")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                        help="change the client's budget, evaluation or runtime (rounds, train.*, eval.*, ...); repeatable")
    parser.add_argument("--device", metavar="D", help="auto, cpu, cuda or cuda:N (default: the run's runtime.device)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")


def run(args: argparse.Namespace) -> int:
    import json

    from flexmoe.commands.fields import parse_fields
    from flexmoe.data import load_examples
    from flexmoe.engine.join import personalize
    from flexmoe.engine.progress import logs_to, make_progress

    fields = parse_fields(args.field)
    examples = load_examples(args.data, format=args.format, fields=fields)
    progress = make_progress(quiet=False)
    with logs_to(progress):
        try:
            result = personalize(args.run, examples, args.data, args.out, args.overrides, args.format,
                                 dict(fields or {}), args.device, progress)
        finally:
            progress.close()
    print(json.dumps(result, indent=2, sort_keys=True) if args.json else _lines(result))
    return 0


def _lines(result: dict) -> str:
    from flexmoe.report.tables import fmt

    personal, stats = result["personalized"], result["statistics"]
    lines = [f"client {result['client']} joined {result['method']} run {result['run']} (round {result['run_round']}): "
             f"{result['num_train']} training, {result['num_test']} test examples",
             f"ROUGE-L: personalised {fmt(personal['rouge_l'])}, global {fmt(personal.get('rouge_l_global'))}, "
             f"base {fmt(result['base']['rouge_l'])}"]
    for key, label in (("rouge_l_vs_base", "personalised - base"), ("rouge_l_vs_global", "personalised - global"),
                       ("global_rouge_l_vs_base", "global - base")):
        if key in stats:
            s = stats[key]
            lines.append(f"  {label}: {s['diff']:+.4f} [95% CI {s['ci_low']:+.4f}, {s['ci_high']:+.4f}] "
                         f"over {s['examples']} paired examples")
    if "doc_loss_vs_base" in stats:
        s = stats["doc_loss_vs_base"]
        lines.append(f"  held-out loss, personalised - base: {s['diff']:+.4f} [{s['ci_low']:+.4f}, {s['ci_high']:+.4f}]")
    lines.append(f"use it: flexmoe generate --run {result['run']} --state-dir {result['state_dir']} "
                 f"--client {result['client']}  (also eval, export)")
    return "\n".join(lines)

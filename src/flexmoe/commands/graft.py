"""`flexmoe graft`: which expert(s) each MoE layer would graft for a data file, and by what margin."""

from __future__ import annotations

import argparse
import json
import math
import random

from flexmoe.commands.fields import add_field_argument
from flexmoe.methods.flex.config import STRATEGIES
from flexmoe.errors import FlexmoeError

# Names only: torch, transformers and the data package load in run(), keeping `flexmoe --help` fast.
DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: bfloat16 on a GPU, float32 on the CPU


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", help="local Hugging Face MoE directory, or 'tiny' (default)")
    parser.add_argument("--data", default=None,
                        help="instruction data file or directory (default: the builtin dataset)")
    parser.add_argument("--format", default=None,
                        help="dolly | alpaca | jsonl | json | parquet | hf (default: from the path)")
    add_field_argument(parser)
    parser.add_argument("--k", type=int, default=1, help="experts grafted per layer (default 1)")
    parser.add_argument("--strategy", default="reconstruction", choices=STRATEGIES)
    parser.add_argument("--max-tokens", type=int, default=4096,
                        help="tokens sampled per layer for the reconstruction loss (default 4096)")
    parser.add_argument("--max-examples", type=int, default=256,
                        help="examples drawn (seeded) from the data as calibration sample (default 256)")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per example (default 256)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="dtype of the base (default auto: bfloat16 on a GPU, float32 on the CPU)")
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    import torch

    from flexmoe.models import load_base, select_experts
    from flexmoe.models.device import resolve_device, resolve_dtype

    from flexmoe.engine.progress import LogProgress, logs_to

    _check_arguments(args)
    progress = LogProgress()  # lines on stderr: stdout stays the table or the JSON
    with logs_to(progress):
        examples = _calibration_examples(args)
        device = resolve_device(args.device)
        dtype = resolve_dtype("auto", device) if args.dtype == "auto" else getattr(torch, args.dtype)
        model, tokenizer = load_base(args.model, dtype=dtype, device=device)
        batches = _batches(examples, tokenizer, args)
        progress.message(f"selecting experts ({args.strategy}, k={args.k}) on {len(examples)} examples")
        selection = select_experts(model, batches, k=args.k, strategy=args.strategy, max_tokens=args.max_tokens,
                                   seed=args.seed)
    report = {"model": str(args.model), "data": args.data or "builtin", "examples": len(examples),
              **selection.to_json()}
    if args.json:
        print(json.dumps(report))
    else:
        print(_table(report))
    return 0


def _check_arguments(args: argparse.Namespace) -> None:
    for name in ("max_examples", "max_length", "batch_size", "max_tokens"):
        if getattr(args, name) < 1:
            raise FlexmoeError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")


def _calibration_examples(args: argparse.Namespace) -> list:
    from flexmoe.data import builtin_examples, load_examples
    from flexmoe.commands.fields import parse_fields

    if args.field and not args.data:
        raise FlexmoeError("--field needs --data")
    fields = parse_fields(args.field)
    examples = load_examples(args.data, format=args.format, fields=fields) if args.data else builtin_examples()
    if len(examples) > args.max_examples:
        examples = random.Random(args.seed).sample(examples, args.max_examples)
    return examples


def _batches(examples, tokenizer, args) -> list[dict]:
    from flexmoe.data import collate, tokenize_examples

    features = tokenize_examples(examples, tokenizer, max_length=args.max_length)
    batches = []
    for start in range(0, len(features), args.batch_size):
        # with labels, selection calibrates on the response tokens (the prompt template is shared)
        batches.append(collate(features[start : start + args.batch_size], tokenizer.pad_token_id))
    return batches


def _table(report: dict) -> str:
    lines = [
        f"model {report['model']}  data {report['data']} ({report['examples']} examples)  "
        f"strategy {report['strategy']}  k={report['k']}",
        f"{'layer':<36} {'experts':<14} {'loss':>12} {'median':>12} {'worst':>12} {'margin':>12} {'tokens':>7}",
    ]
    for name, entry in report["layers"].items():
        experts = ",".join(map(str, entry["experts"]))
        lines.append(f"{name:<36} {experts:<14} {_number(entry.get('loss')):>12} "
                     f"{_number(entry.get('median_loss')):>12} {_number(entry.get('worst_loss')):>12} "
                     f"{_number(entry.get('margin')):>12} {entry.get('tokens', '-'):>7}")
    lines.append("loss: reconstruction loss of the chosen experts; median, worst: of the single experts; "
                 "margin: loss of the runner-up candidate minus the chosen one (larger = clearer choice)")
    return "\n".join(lines)


def _number(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"

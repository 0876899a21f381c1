"""`flexmoe pretrain`: train the tiny qwen2_moe base from its config, then measure it and write its card."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_CONFIG = "configs/pretrain-tiny.toml"
DEFAULT_OUTPUT = "runs/pretrain-tiny"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help=f"pretrain TOML file (default: {DEFAULT_CONFIG} if present, else built-in defaults)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT,
                        help=f"model directory to write (default: {DEFAULT_OUTPUT})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.steps=100 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt")
    parser.add_argument("--eval-only", action="store_true",
                        help="skip training: measure the model already in OUTPUT and rewrite its card")
    parser.add_argument("--no-eval", action="store_true", help="train only; write no evaluation or card")
    parser.add_argument("--max-minutes", type=float, default=None, metavar="M",
                        help="stop training after M minutes at a step boundary, leaving a checkpoint "
                             "for --resume (no model files, no card until the run completes)")


def run(args: argparse.Namespace) -> int:
    from flexmoe.errors import FlexmoeError
    from flexmoe.pretrain import load_config, pretrain
    from flexmoe.pretrain.config import CHECKPOINT

    config_path = args.config
    if config_path is None and Path(DEFAULT_CONFIG).is_file():
        config_path = DEFAULT_CONFIG
    config = load_config(config_path, args.overrides)
    output = Path(args.output)
    if args.eval_only and args.no_eval:
        raise FlexmoeError("--eval-only and --no-eval exclude each other")
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise FlexmoeError(f"--max-minutes must be positive, got {args.max_minutes}")
    if not args.eval_only:
        limit = None if args.max_minutes is None else args.max_minutes * 60
        pretrain(config, output, resume=args.resume, time_limit_s=limit)
        if (output / CHECKPOINT).is_file():  # stopped by the time limit
            return 0
    if not args.no_eval:
        from flexmoe.pretrain.card import evaluate_and_write_card
        evaluate_and_write_card(output, config, config_path=config_path or "(built-in defaults)")
        print(f"wrote {output / 'README.md'}")
    return 0

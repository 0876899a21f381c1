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


def run(args: argparse.Namespace) -> int:
    from flexmoe.errors import FlexmoeError
    from flexmoe.pretrain import load_config, pretrain

    config_path = args.config
    if config_path is None and Path(DEFAULT_CONFIG).is_file():
        config_path = DEFAULT_CONFIG
    config = load_config(config_path, args.overrides)
    output = Path(args.output)
    if args.eval_only and args.no_eval:
        raise FlexmoeError("--eval-only and --no-eval exclude each other")
    if not args.eval_only:
        pretrain(config, output, resume=args.resume)
    if not args.no_eval:
        from flexmoe.pretrain.card import evaluate_and_write_card
        evaluate_and_write_card(output, config)
        print(f"wrote {output / 'README.md'}")
    return 0

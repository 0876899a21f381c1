"""The `flexmoe` command line.

Each sub-command lives next to the code it drives: a module exposing
`add_arguments(parser)` and `run(args) -> int`. The registry below imports it lazily,
so `flexmoe --help` stays fast and one command's heavy imports never slow another.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from flexmoe.errors import FlexmoeError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("flexmoe.commands.run", "run federated fine-tuning (default: FLEx on the shipped tiny MoE)"),
    "compare": ("flexmoe.commands.compare", "run several methods over several seeds on the same partitions and compare them"),
    "report": ("flexmoe.commands.report", "rebuild a report (tables and plots) from run directories"),
    "graft": ("flexmoe.commands.graft", "select the expert(s) each MoE layer would graft for a data file"),
    "data": ("flexmoe.commands.data", "build, describe and partition instruction datasets"),
    "eval": ("flexmoe.commands.eval", "re-evaluate a finished run's personalized models"),
    "generate": ("flexmoe.commands.generate", "generate text with a client's personalized (or the global) model"),
    "export": ("flexmoe.commands.export", "export a client's personalized model as a self-contained directory"),
    "personalize": ("flexmoe.commands.personalize", "a new organisation joins a trained federation: graft and train its personal part"),
    "pretrain": ("flexmoe.commands.pretrain", "pretrain the shipped tiny MoE from its config"),
    "plan": ("flexmoe.commands.plan", "bytes per round and device memory of one client step, for a model or a known shape"),
    "bench": ("flexmoe.commands.bench", "run the benchmarks of a source checkout (results under benchmarks/results/)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flexmoe",
        description="Personalized federated fine-tuning of Mixture-of-Experts LLMs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        command_parser.set_defaults(_module=module_name)
        _load(module_name).add_arguments(command_parser)
    return parser


def _load(module_name: str):
    return importlib.import_module(module_name)


def main(argv: list[str] | None = None) -> int:
    # bitsandbytes (the optional quant extra, imported by peft when installed) logs a warning about
    # an optional CPU kernel package on import: it would garble one-line errors and JSON output
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(_load(args._module).run(args) or 0)
    except FlexmoeError as err:
        print(f"flexmoe {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flexmoe {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())

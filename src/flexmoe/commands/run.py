"""`flexmoe run`: federated fine-tuning in-process (default: FLEx on the shipped tiny MoE)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from flexmoe.errors import FlexmoeError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML run config (see configs/)")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                        help="override a config key, dotted for sections (e.g. --set train.lr=3e-4); repeatable")
    parser.add_argument("--output-dir", metavar="DIR", help="run directory (default: runs/<method>-<timestamp>)")
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last completed round")
    parser.add_argument("--quiet", action="store_true", help="plain log lines instead of the live display")


def run(args: argparse.Namespace) -> int:
    from flexmoe.config import load_config
    from flexmoe.engine.progress import logs_to, make_progress
    from flexmoe.engine.simulation import Simulation

    if args.resume and (args.config or args.overrides or args.output_dir):
        raise FlexmoeError("--resume DIR continues DIR with its saved config.toml; drop --config/--set/--output-dir")
    config = None if args.resume else load_config(args.config, args.overrides)
    progress = make_progress(args.quiet)
    with logs_to(progress):
        if args.resume:
            run_dir = Path(args.resume)
            summary = Simulation.resume(run_dir, progress)
        else:
            run_dir = Path(args.output_dir or f"runs/{config.method}-{time.strftime('%Y%m%d-%H%M%S')}")
            summary = Simulation(config, run_dir, progress).run()
    print(
        f"{summary['method']}: {summary['rounds_completed']} rounds, ROUGE-L {_fmt(summary['rouge_l_avg'])}, "
        f"knowledge loss {_fmt(summary['knowledge_loss'])} (base {_fmt(summary['knowledge_loss_base'])}), "
        f"{summary['bytes_up']:,} bytes up / {summary['bytes_down']:,} down"
        + (f", (ε, δ) = ({summary['dp_epsilon']:.3g}, {summary['dp_delta']:g})" if summary.get("dp_epsilon") else "")
    )
    print(f"report: {run_dir / 'report.md'}")
    print(_what_matters(summary))
    if summary.get("phase_seconds"):
        print(_timings(summary["phase_seconds"]))
    return 0


def _what_matters(summary: dict) -> str:
    """The three numbers to look at first, each beside the untouched base's."""
    parts = []
    for label, key in (("personalised ROUGE-L", "rouge_l_avg"), ("held-out loss", "knowledge_loss"),
                       ("probe accuracy", "probe_accuracy")):
        if summary.get(key) is not None:
            parts.append(f"{label} {_fmt(summary[key])} (base {_fmt(summary.get(f'{key}_base'))})")
    return "what matters: " + ("; ".join(parts) if parts else "no evaluation ran")


def _timings(phases: dict[str, float]) -> str:
    return ("time: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in phases.items())
            + f"; {sum(phases.values()):.0f} s in all")


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"

"""`flexmoe compare`: run several methods over several seeds on the same partitions, then report.

Every (method, seed) is an ordinary run directory under `OUTPUT/<method>/seed-<seed>/`, made by
the in-process engine; a seed fixes the partition, LoRA initialisation and client sampling, so
all methods of a seed see the same clients. Re-running the same command skips finished runs
and resumes interrupted ones. FLEx ablations are named variants (see VARIANTS).
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

from flexmoe.errors import FlexmoeError
from flexmoe.methods import registered

# variant name -> (method, config overrides): the FLEx paper's ablations, a graft that starts at
# zero instead of from the selected expert (personal capacity without grafting), the graft trained
# as a full copy (flex-full; the default is a frozen copy under LoRA), and MoE + FedAvg
# with LoRA on attention and the experts (FC-MoE's trainables, aggregated plainly) or with every
# weight trainable (the paper's MoE + X; "full" needs runtime.base_dtype=fp32)
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "flex-nogate": ("flex", ("flex.gate=none",)),
    "flex-random": ("flex", ("flex.selection=random",)),
    "flex-k2": ("flex", ("flex.k=2",)),
    "flex-k3": ("flex", ("flex.k=3",)),
    "flex-zero": ("flex", ("flex.graft_init=zero", "flex.graft_train=full")),  # no copy to put LoRA on
    "flex-full": ("flex", ("flex.graft_train=full",)),  # the graft a full trainable copy (the default: LoRA)
    "fedavg+experts": ("fedavg", ("lora.scope=attention+experts",)),
    "fedavg+full": ("fedavg", ("lora.scope=full",)),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", required=True, metavar="A,B,...",
                        help="methods to compare (flex, fedavg, ..., local) and FLEx ablations "
                             f"({', '.join(VARIANTS)})")
    parser.add_argument("--seeds", default="0", metavar="S,S,...", help="seeds, comma-separated (default: 0)")
    parser.add_argument("--config", metavar="FILE", help="TOML run config shared by every run")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                        help="override a config key for every run (repeatable)")
    parser.add_argument("--output-dir", metavar="DIR", help="default: runs/compare-<timestamp>")
    parser.add_argument("--reference", metavar="METHOD",
                        help="the method every other is compared with, paired (default: the best shared "
                             "federated baseline, never fedper, fedavg-ft, local or fcmoe)")
    parser.add_argument("--quiet", action="store_true", help="plain log lines instead of the live display")


def parse_methods(text: str) -> list[str]:
    methods = tuple(registered())
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise FlexmoeError("--methods: name at least one method")
    for name in names:
        if name not in methods and name not in VARIANTS:
            raise FlexmoeError(f"--methods: unknown method {name!r}; choose from {', '.join((*methods, *VARIANTS))}")
    if len(set(names)) != len(names):
        raise FlexmoeError(f"--methods: {next(n for n in names if names.count(n) > 1)!r} is listed twice")
    return names


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise FlexmoeError(f"--seeds {text!r}: expected comma-separated non-negative integers, e.g. 0,1,2") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise FlexmoeError(f"--seeds {text!r}: expected distinct non-negative integers, e.g. 0,1,2")
    return seeds


def plan(methods: list[str], seeds: list[int], config_file: str | None, overrides: list[str], out: Path) -> list:
    """(run directory, config) of every run, all validated before anything runs."""
    from flexmoe.config import load_config

    runs = []
    for name in methods:
        method, extra = VARIANTS.get(name, (name, ()))
        for seed in seeds:
            config = load_config(config_file, [*overrides, f"method={method}", *extra, f"seed={seed}"])
            runs.append((out / name / f"seed-{seed}", config))
    return runs


def run_one(run_dir: Path, config, progress) -> None:
    """Run, resume or skip (when finished) one comparison run."""
    import json

    from flexmoe.config import load_config
    from flexmoe.rundir import is_run_dir
    from flexmoe.engine.simulation import Simulation

    if not is_run_dir(run_dir):
        Simulation(config, run_dir, progress).run()
        return
    if load_config(run_dir / "config.toml") != config:
        raise FlexmoeError(f"{run_dir} holds a run with another config; pick another --output-dir")
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    finished = summary.get("rounds_completed") == config.rounds and summary.get("wall_seconds") is not None
    if not finished:
        Simulation.resume(run_dir, progress)


def run(args: argparse.Namespace) -> int:
    from flexmoe.engine.progress import logs_to, make_progress
    from flexmoe.report import write_compare_report

    methods, seeds = parse_methods(args.methods), parse_seeds(args.seeds)
    out = Path(args.output_dir or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    runs = plan(methods, seeds, args.config, args.overrides, out)
    reference = getattr(args, "reference", None)
    if reference is not None and reference not in methods:
        raise FlexmoeError(f"--reference {reference!r} is not among --methods {args.methods!r}")
    for index, (run_dir, config) in enumerate(runs, start=1):
        print(f"[{index}/{len(runs)}] {run_dir.parent.name} seed {config.seed} -> {run_dir}", flush=True)
        progress = make_progress(args.quiet)
        with logs_to(progress):
            run_one(run_dir, config, progress)
    print(f"writing the comparison report ({len(runs)} runs)", flush=True)
    report = write_compare_report([run_dir for run_dir, _ in runs], out, command=_command(args),
                                  reference=reference)
    print(f"report: {report}")
    return 0


def _command(args: argparse.Namespace) -> str:
    parts = ["flexmoe", "compare", "--methods", args.methods, "--seeds", args.seeds]
    if args.config:
        parts += ["--config", args.config]
    for item in args.overrides:
        parts += ["--set", item]
    if args.output_dir:
        parts += ["--output-dir", args.output_dir]
    if getattr(args, "reference", None):
        parts += ["--reference", args.reference]
    return shlex.join(parts)

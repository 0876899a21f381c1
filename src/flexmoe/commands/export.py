"""`flexmoe export`: one client's personalised model as a self-contained directory.

Load it with `flexmoe.load_personalized(DIR)`; the shared LoRA is also written in standard PEFT
format (`DIR/adapter`), or folded into the base weights with --merge.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", metavar="DIR", required=True, help="run directory written by flexmoe run")
    parser.add_argument("--client", metavar="ID", type=int, required=True, help="the client whose model to export")
    parser.add_argument("--out", metavar="DIR", required=True, help="new directory to write (must not exist)")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="where the clients keep their state (a Flower SuperNode's state-dir; default DIR/clients)")
    parser.add_argument("--device", metavar="D",
                        help="auto, cpu, cuda or cuda:N (default: the run's runtime.device)")
    parser.add_argument("--merge", action="store_true", help="fold the LoRA into the base weights (PEFT merge_and_unload)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="dtype of model/ (default: the base's, when lossless; else float32)")


def run(args: argparse.Namespace) -> int:
    from flexmoe.engine.export import export_client, read_manifest
    from flexmoe.engine.progress import LogProgress, logs_to

    with logs_to(LogProgress()):  # loading and writing announced on stderr
        out = export_client(args.run, args.client, args.out, merge=args.merge, state_dir=args.state_dir,
                            dtype=args.dtype, device=args.device)
    manifest = read_manifest(out)
    parts = [f"model/ ({manifest['dtype']}" + (", LoRA merged)" if manifest["merged"] else ")")]
    parts += [f"{name}" for name in (manifest["adapter"] and "adapter/ (PEFT)", manifest["personal"]) if name]
    print(f"exported client {args.client} ({manifest['method']}, round {manifest['round']}) to {out}: {', '.join(parts)}")
    print(f"load it with: flexmoe.load_personalized({str(out)!r})")
    return 0

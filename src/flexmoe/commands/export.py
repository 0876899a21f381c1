"""`flexmoe export`: one client's personalised model as a directory that is a Hugging Face model.

A grafted model (FLEx) loads with `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`;
a method without graft gives a plain checkpoint with --merge, else a PEFT adapter directory.
`flexmoe.load_personalized(DIR)` loads every layout (see flexmoe.engine.export).
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
    parser.add_argument("--merge", action="store_true",
                        help="methods without graft: fold the LoRA into the weights (PEFT merge_and_unload) instead of "
                             "writing a PEFT adapter; a grafted model is always merged")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="dtype of the weights (default: the base checkpoint's; a graft stays float32)")


def run(args: argparse.Namespace) -> int:
    from flexmoe.engine.export import BASE_DIR, export_client, read_manifest
    from flexmoe.engine.progress import LogProgress, logs_to

    with logs_to(LogProgress()):  # loading and writing announced on stderr
        out = export_client(args.run, args.client, args.out, merge=args.merge, state_dir=args.state_dir,
                            dtype=args.dtype, device=args.device)
    manifest = read_manifest(out)
    print(f"exported client {args.client} ({manifest['method']}, round {manifest['round']}) to {out}: "
          f"{_DESCRIPTIONS[manifest['layout']]}, {manifest['dtype']}")
    for line in _LOADING[manifest["layout"]]:
        print(line.format(out=str(out), base=str(out / BASE_DIR)))
    return 0


_DESCRIPTIONS = {
    "grafted": "a transformers model with its graft (custom code, LoRA merged)",
    "merged": "a plain transformers checkpoint",
    "adapter": "a PEFT adapter, on the weights in base-without-adapter/",
}
_LOADING = {
    "grafted": ["load it with: AutoModelForCausalLM.from_pretrained({out!r}, trust_remote_code=True)",
                "         or: flexmoe.load_personalized({out!r})"],
    "merged": ["load it with: AutoModelForCausalLM.from_pretrained({out!r})",
               "         or: flexmoe.load_personalized({out!r})"],
    "adapter": ["load it with: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), {out!r})",
                "         or: flexmoe.load_personalized({out!r})"],
}

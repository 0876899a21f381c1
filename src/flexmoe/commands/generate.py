"""`flexmoe generate`: text from a client's personalised model (or the global one) of a finished run.

Prompts are instructions, formatted with the run's prompt template, so the model sees what it
was fine-tuned on. Tokens are printed as they are generated. Without --prompt or --file, a
terminal gets an interactive loop; piped input is read as one instruction per line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flexmoe.errors import FlexmoeError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", metavar="DIR", required=True, help="run directory written by flexmoe run")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--client", metavar="ID", type=int, help="use this client's personalised model")
    who.add_argument("--global", dest="use_global", action="store_true",
                     help="use the global model (base + global shared weights, no graft)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", metavar="TEXT", help="one instruction")
    source.add_argument("--file", metavar="F", help="a text file with one instruction per line")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="where the clients keep their state (a Flower SuperNode's state-dir; default DIR/clients)")
    parser.add_argument("--device", metavar="D",
                        help="auto, cpu, cuda or cuda:N (default: the run's runtime.device)")
    parser.add_argument("--max-new-tokens", metavar="N", type=int, default=128, help="tokens per answer (default 128)")


def run(args: argparse.Namespace) -> int:
    from flexmoe.engine.progress import LogProgress, logs_to
    from flexmoe.engine.restore import restore

    if args.max_new_tokens < 1:
        raise FlexmoeError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    prompts = _prompts(args)  # before loading the model: a bad file fails fast
    with logs_to(LogProgress()):  # loading announced on stderr; answers stream on stdout
        restored = restore(args.run, None if args.use_global else args.client, args.state_dir, args.device)
    template = restored.checkpoint.config.data.template
    if prompts is None:
        _interactive(restored, template, args.max_new_tokens)
        return 0
    for i, instruction in enumerate(prompts):
        if len(prompts) > 1:
            print(("\n" if i else "") + f"### {instruction}", flush=True)
        stream_answer(restored.model, restored.tokenizer, instruction, template, args.max_new_tokens)
    return 0


def _prompts(args: argparse.Namespace) -> list[str] | None:
    """The instructions to answer; None means an interactive session."""
    if args.prompt is not None:
        if not args.prompt.strip():
            raise FlexmoeError("--prompt is empty")
        return [args.prompt]
    if args.file is not None:
        path = Path(args.file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise FlexmoeError(f"{path}: cannot read prompts ({err})") from None
    elif sys.stdin.isatty():
        return None
    else:
        lines = sys.stdin.read().splitlines()
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise FlexmoeError(f"{args.file or 'standard input'}: no prompts (one instruction per line)")
    return prompts


def stream_answer(model, tokenizer, instruction: str, template: str, max_new_tokens: int) -> None:
    """Greedy answer to `instruction`, printed to stdout token by token (then a newline)."""
    import torch
    from transformers import TextStreamer

    from flexmoe.data import Example, format_prompt

    prompt = format_prompt(Example(instruction=instruction, response=""), template=template, tokenizer=tokenizer)
    enc = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, streamer=streamer)


def _interactive(restored, template: str, max_new_tokens: int) -> None:
    who = "global model" if restored.client_id is None else f"client {restored.client_id}"
    print(f"{who} of {restored.checkpoint.run_dir} (round {restored.checkpoint.round}); "
          "empty line or Ctrl-D to quit", flush=True)
    while True:
        try:
            instruction = input("> ").strip()
        except EOFError:
            print()
            return
        if not instruction:
            return
        stream_answer(restored.model, restored.tokenizer, instruction, template, max_new_tokens)

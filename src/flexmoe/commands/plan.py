"""`flexmoe plan [MODEL]`: bytes per round and device memory of one client step, before anything runs.

MODEL is a local model directory, "tiny", or a shipped shape (`--list`); default: the config's
model. Built on the meta device from the real config (see flexmoe.cost.plan), so it sizes a 47B
Mixtral on a laptop in seconds.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", metavar="MODEL",
                        help="model directory, 'tiny' or a shape name (--list); default: the config's model")
    parser.add_argument("--config", metavar="FILE", help="run config (TOML); default: the shipped defaults")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), e.g. --set method=fedavg")
    parser.add_argument("--batch", type=int, metavar="B", help="sequences per step (default train.batch_size)")
    parser.add_argument("--length", type=int, metavar="T", help="tokens per sequence (default train.max_length)")
    parser.add_argument("--response-tokens", type=int, metavar="N",
                        help="positions of a step that predict a response token (default: all, the upper bound)")
    parser.add_argument("--device-type", choices=("cpu", "cuda"),
                        help="the device to plan for (default: runtime.device; auto = this machine's)")
    parser.add_argument("--list", action="store_true", help="list the shipped shapes and exit")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from flexmoe.config import load_config
    from flexmoe.errors import FlexmoeError
    from flexmoe.cost.plan import plan, shape_names

    if args.list:
        print("\n".join(shape_names()))
        return 0
    for name in ("batch", "length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise FlexmoeError(f"--{name} must be at least 1, got {getattr(args, name)}")
    config = load_config(args.config, args.overrides)
    result = plan(config, args.model, args.batch, args.length, args.response_tokens, args.device_type)
    print(json.dumps(result.to_json(), indent=2) if args.json else render(result))
    return 0


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,} B"


def render(p) -> str:
    lines = [
        f"plan: {p.method} on {p.model} ({p.model_type}, {p.total_params / 1e9:.2f}B parameters), "
        f"base {p.base_dtype} on {p.device_type}; step of {p.batch} x {p.length} tokens, "
        f"{p.response_tokens} through the LM head",
        "",
        f"per client per round (tensors travel as {p.wire}: wire.dtype / wire.quantize)",
        f"  down (server -> client)     {_size(p.bytes_down)}" + (
            f" (largest round: {_size(p.bytes_down_max)})" if p.bytes_down_max != p.bytes_down else ""),
        f"  up (client -> server)       {_size(p.bytes_up)}",
        f"  shared parameters           {p.shared_params:,}",
        "kept between rounds",
        f"  personal state per client   {_size(p.personal_state_bytes)} (what a client stores: graft and gate, "
        "or its LoRA; personal LoRA; fine-tuned weights)",
        f"  optimiser state per client  {_size(p.client_optimizer_bytes)}",
        f"  server state                {_size(p.server_state_bytes)} (global shared weights + server optimiser)",
        "",
        "device memory of one client step      without checkpointing   with gradient checkpointing",
    ]
    rows = (("frozen weights", "weights_frozen"), ("trainable weights (fp32)", "weights_trainable"),
            ("gradients", "gradients"), ("optimiser state", "optimizer_state"),
            ("activations (end of forward)", "activations"),
            ("forward+backward peak", "step_transient"), ("peak", "peak"))
    for label, key in rows:
        lines.append(f"  {label:<36} {_size(getattr(p.memory, key)):>20}   {_size(getattr(p.memory_checkpointed, key)):>20}")
    lines.append(f"  ({p.trainable_params:,} trainable parameters; peak = weights + optimiser state + "
                 "forward+backward peak)")
    lines.append(f"  loading the base (weights + one tensor in conversion) {_size(p.load_peak):>15}")
    if p.runtime_bytes:
        lines.append(f"  this process before any model (Python, torch) {_size(p.runtime_bytes):>23}")
    lines.append(f"  peak of the run (train.gradient_checkpointing as set) {_size(p.peak_bytes):>15}")
    share = p.quantizable_params / p.total_params
    if p.quantize == "int8":
        lines.append(f"  runtime.quantize = int8: bitsandbytes quantises {p.quantizable_params:,} nn.Linear "
                     f"parameters ({share:.1%}; fused experts are not quantised); they are counted here at "
                     f"{p.base_dtype}, so the frozen weights above are an upper bound")
    elif p.quantize == "nf4":
        lines.append("  runtime.quantize = nf4: the fused experts are counted at 4 bits (+ one fp32 absmax per 64), and "
                     f"their {p.base_dtype} copy dequantised for each layer's backward; on cuda bitsandbytes also "
                     f"quantises {p.quantizable_params:,} nn.Linear parameters ({share:.1%}), counted at {p.base_dtype}")
    return "\n".join(lines)

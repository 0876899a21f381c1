"""Bytes per round of every method on the shipped tiny base and on real MoE shapes (no weights).

On the tiny base the messages are real: built from the loaded model and serialised, their
length counted. Qwen1.5-MoE-A2.7B, OLMoE-1B-7B and Mixtral-8x7B are built on the meta device from their
published configs; each method prepares, grafts and builds its round-1 messages with its own
code (`flexmoe.cost.comm.method_message_sizes`), and the safetensors message size is computed
from the tensors' names, dtypes and shapes (checked byte for byte against real messages in
tests/cost/test_cost_comm.py). Weights travel in fp32 (the engines' default), LoRA r = 8; the last
table sizes FLEx's messages in the compressed forms (`wire.dtype`, `wire.quantize`).
"""

from __future__ import annotations

import os
import pathlib
import time

from benchmarks.machine import header_markdown, write_result

# rows: (label, run-config overrides)
ROWS = (
    ("flex", ["method=flex"]),
    ("flex-k2", ["method=flex", "flex.k=2"]),
    ("flex-routers", ["method=flex", "flex.federate_routers=true"]),
    ("fedavg / fedprox / fedavgm / fedadagrad / fedyogi / fedadam", ["method=fedavg"]),
    ("scaffold", ["method=scaffold"]),
    ("fcmoe (attention+experts LoRA)", ["method=fcmoe"]),
    ("flex+fcmoe", ["method=flex+fcmoe"]),
    ("fedavg, LoRA on attention+experts", ["method=fedavg", "lora.scope=attention+experts"]),
    ("fedavg, full fine-tuning", ["method=fedavg", "lora.scope=full"]),
    ("local", ["method=local"]),
)
FLEX, FULL, EXPERTS_LORA = "flex", "fedavg, full fine-tuning", "fedavg, LoRA on attention+experts"
TARGET_SHAPE, TARGET_RATIO = "Qwen1.5-MoE-A2.7B", 1 / 1000


def _mb(n: int) -> str:
    return f"{n / 1e6:,.3f}" if n < 10**7 else f"{n / 1e6:,.1f}"


def main(results_dir: pathlib.Path) -> None:
    from flexmoe.cost.comm import REAL_SHAPES, real_shape_model

    started = time.monotonic()
    lines = [header_markdown("Communication per client per round on real MoE shapes", "python -m benchmarks comm"),
             __doc__.split("\n\n", 1)[1].strip(), "",
             "MB = 10^6 bytes, per sampled client per round; up = client → server, down = server → client. "
             "FC-MoE's downlink grows from round 2 by its consensus direction (not counted here).", ""]
    ratios = {}
    lines += _shape_section("tiny (shipped base, real messages)", _tiny_base, _real_bytes, ratios)
    for shape in REAL_SHAPES:
        lines += _shape_section(shape, lambda shape=shape: real_shape_model(shape), None, ratios)
    lines += _wire_section()
    ratio = ratios[TARGET_SHAPE][0]
    lines += ["## Targets", "",
              f"- FLEx / FedAvg-full bytes up at the {TARGET_SHAPE} shape: 1/{1 / ratio:,.0f} "
              f"(target <= 1/{1 / TARGET_RATIO:,.0f}: {'met' if ratio <= TARGET_RATIO else 'missed'}).", "",
              f"Computed in {time.monotonic() - started:.0f} s (load average {os.getloadavg()[0]:.1f})."]
    write_result(results_dir, "comm", lines, echo=False)


WIRES = (("fp32", []), ("bf16", ["wire.dtype=bf16"]), ("fp16", ["wire.dtype=fp16"]), ("int8", ["wire.quantize=int8"]))


def _wire_section() -> list[str]:
    """FLEx's bytes up per client per round under each `wire` form, on every real shape."""
    from flexmoe.config import load_config
    from flexmoe.cost.comm import REAL_SHAPES, method_message_sizes, real_shape_model

    lines = ["## Compressed messages (FLEx, `[wire]`)", "",
             "MB up per client per round (the downlink shrinks alike); int8 carries one float32 scale per row.", "",
             "| shape | " + " | ".join(w for w, _ in WIRES) + " | int8 / fp32 |", "|---|" + "---:|" * (len(WIRES) + 1)]
    for shape in REAL_SHAPES:
        up = [method_message_sizes(load_config(None, ["method=flex", *o]), real_shape_model(shape))["up"] for _, o in WIRES]
        lines.append(f"| {shape} | " + " | ".join(_mb(u) for u in up) + f" | {up[-1] / up[0]:.3f} |")
    return [*lines, ""]


def _tiny_base():
    from flexmoe.models import load_base

    return load_base("tiny")[0]


def _real_bytes(tensors, metadata=None) -> int:
    from flexmoe.wire import serialize

    return len(serialize(tensors, metadata))


def _shape_section(title: str, fresh_model, measure, ratios: dict) -> list[str]:
    """One table of every method's message sizes on `fresh_model()` (a new base per method);
    records (FLEx / full, FLEx / attention+experts LoRA) bytes-up ratios in `ratios[title]`."""
    from flexmoe.config import load_config
    from flexmoe.cost.comm import method_message_sizes, serialized_size

    lines = [f"## {title}", "", "| method | shared (sent) parameters | MB up | MB down |", "|---|---:|---:|---:|"]
    up = {}
    for label, overrides in ROWS:
        sizes = method_message_sizes(load_config(None, overrides), fresh_model(), measure=measure or serialized_size)
        up[label] = sizes["up"]
        lines.append(f"| {label} | {sizes['shared_params']:,} | {_mb(sizes['up'])} | {_mb(sizes['down'])} |")
    ratios[title] = (up[FLEX] / up[FULL], up[FLEX] / up[EXPERTS_LORA])
    lines += ["", f"FLEx / FedAvg-full: {up[FLEX] / up[FULL]:.2e} (1/{up[FULL] / up[FLEX]:,.0f}); "
              f"FLEx / FedAvg attention+experts LoRA: {up[FLEX] / up[EXPERTS_LORA]:.2e} "
              f"(1/{up[EXPERTS_LORA] / up[FLEX]:,.1f}) (bytes up).", ""]
    return lines

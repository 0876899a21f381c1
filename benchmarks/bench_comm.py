"""Bytes per round of every method on real MoE shapes, from configs alone (no weights).

Qwen1.5-MoE-A2.7B, OLMoE-1B-7B and Mixtral-8x7B are built on the meta device from their
published configs; each method prepares, grafts and builds its round-1 messages with its own
code (`flexmoe.eval.comm.method_message_sizes`), and the safetensors message size is computed
from the tensors' names, dtypes and shapes (checked byte for byte against real messages in
tests/test_eval_comm.py). Weights travel in fp32 (what the engines send), LoRA r = 8.
"""

from __future__ import annotations

import datetime
import pathlib
import time

from benchmarks.machine import header_markdown

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


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f}"


def main(results_dir: pathlib.Path) -> None:
    from flexmoe.config import load_config
    from flexmoe.eval.comm import REAL_SHAPES, method_message_sizes, real_shape_model

    started = time.monotonic()
    lines = [header_markdown("Communication per client per round on real MoE shapes", "python -m benchmarks comm"),
             __doc__.split("\n\n", 1)[1].strip(), "",
             "MB = 10^6 bytes, per sampled client per round; up = client → server, down = server → client. "
             "FC-MoE's downlink grows from round 2 by its consensus direction (not counted here).", ""]
    for shape in REAL_SHAPES:
        lines += [f"## {shape}", "", "| method | shared (sent) parameters | MB up | MB down |", "|---|---:|---:|---:|"]
        for label, overrides in ROWS:
            sizes = method_message_sizes(load_config(None, overrides), real_shape_model(shape))
            lines.append(f"| {label} | {sizes['shared_params']:,} | {_mb(sizes['up'])} | {_mb(sizes['down'])} |")
        lines.append("")
    lines.append(f"Computed in {time.monotonic() - started:.0f} s.")
    path = results_dir / f"comm-{datetime.date.today().isoformat()}.md"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")

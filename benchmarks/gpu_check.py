"""The GPU check (`scripts/gpu-check.sh`): Qwen1.5-MoE-A2.7B's shape at full depth, random init,
bf16, on one CUDA GPU: a FLEx client (selection, graft, local steps) with the experts in bf16
and with them quantised to nf4 (`runtime.quantize = nf4`), each against `flexmoe plan`'s peak
for the same step; tokens/s and MFU (counted matmul FLOPs / step time / the bf16 matmul peak
measured in the run). It writes `benchmarks/results/gpu-check-<date>.md`.

`--dry-run` runs the same code on the CPU at cut depth (1 layer, the tiny tokenizer's vocabulary,
batch 1 x 32 tokens) and writes its file under build/gpu-check/ (a check of the code, not a
benchmark); without `--dry-run` and without CUDA it refuses in one line.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import torch

from benchmarks.bench_gpu import matmul_peak, measure
from benchmarks.machine import header_markdown, write_result

SHAPE = "qwen1.5-moe-a2.7b"
ROWS = (("FLEx, experts bf16", ["method=flex"]), ("FLEx, experts nf4", ["method=flex", "runtime.quantize=nf4"]))
FULL = dict(layers=None, vocab=None, batch=4, length=512, steps=3, matmul=8192)
DRY = dict(layers=1, vocab=6144, batch=1, length=32, steps=1, matmul=256)
TARGET = 0.20  # |measured / planned - 1|
ROOT = pathlib.Path(__file__).resolve().parent.parent


def check(dry_run: bool) -> tuple[list[str], list[dict]]:
    from flexmoe.config import load_config
    from flexmoe.cost.plan import plan
    from flexmoe.shapes import shape_config

    size = DRY if dry_run else FULL
    device = torch.device("cpu") if dry_run else torch.device("cuda", 0)
    shape = shape_config(SHAPE, layers=size["layers"], vocab_size=size["vocab"])
    peak_flops = matmul_peak(device, size=size["matmul"], repeats=2 if dry_run else 10)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        shape.save_pretrained(directory)  # the plan reads the (cut) config like a model directory's
        for label, overrides in ROWS:
            config = load_config(None, [*overrides, "runtime.base_dtype=bf16"])
            planned = plan(config, directory, batch=size["batch"], length=size["length"], device_type=device.type)
            m = measure(overrides, shape, device, size["batch"], size["length"], size["steps"], 1, peak_flops)
            rows.append({"label": label, "planned": planned.memory.peak, "measure": m,
                         "params": planned.total_params})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    device_name = "CPU (dry run)" if dry_run else torch.cuda.get_device_name(device)
    lines = [header_markdown(f"GPU check: {SHAPE} shape ({shape.num_hidden_layers} layers) on {device_name}",
                             "scripts/gpu-check.sh" + (" --dry-run" if dry_run else "")),
             f"- bf16 matmul peak measured in this run: {peak_flops / 1e12:.2f} TFLOP/s", "",
             __doc__.split("\n\n", 1)[0].strip(), "",
             "| client | parameters | batch x length | tokens/s | MFU | planned peak GiB | measured peak GiB | "
             "measured / planned | selection s |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        m, ratio = row["measure"], row["measure"].peak_bytes / row["planned"]
        lines.append(f"| {row['label']} | {row['params'] / 1e9:.2f} B | {m.batch} x {m.length} | "
                     f"{m.tokens_per_second:,.0f} | {m.mfu:.1%} | {row['planned'] / 2**30:.2f} | "
                     f"{m.peak_bytes / 2**30:.2f} | {ratio:.2f} ({'met' if abs(ratio - 1) <= TARGET else 'missed'}) | "
                     f"{m.selection_seconds:.2f} |")
    lines += ["", "Measured peak: `torch.cuda.max_memory_allocated` over the steps on a GPU; on the CPU the "
              "tensors alive before the step plus the most created in it (`TensorMemory`)."]
    return lines, rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU at cut depth")
    parser.add_argument("--out", metavar="DIR", help="where the result file goes")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device on this machine (torch {torch.__version__}); "
              "use --dry-run to check the code on the CPU", file=sys.stderr)
        return 2
    out = pathlib.Path(args.out) if args.out else ROOT / ("build/gpu-check" if args.dry_run else "benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    lines, _ = check(args.dry_run)
    write_result(out, "gpu-check-dry-run" if args.dry_run else "gpu-check", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

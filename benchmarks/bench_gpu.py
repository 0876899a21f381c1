"""FLEx and FedAvg on one GPU at the Qwen1.5-MoE-A2.7B shape: step throughput, MFU, peak memory,
expert-selection time, personal-state swap time and a 4-client round.

The model is the shipped shape `qwen1.5-moe-a2.7b` (the public config's architecture fields),
randomly initialised in bf16 on the GPU: no weights are needed, and throughput, FLOPs and memory
do not depend on the weights' values (routing does a little: random routers spread tokens
evenly). Sequences of 512 random tokens, every position a response token (the most the LM head
can cost). The per-client batch is the largest of 8, 4, 2, 1 whose `flexmoe plan` peak fits in
90% of the GPU's memory. Each method is built by flexmoe's own code (the method's
`prepare_model`, `select_experts` and `graft` for FLEx) and trained by `local_train`.
Model FLOPs are the matmul FLOPs a step executes (`flexmoe.cost.flops`, torch's FlopCounterMode
over the real forward and backward); MFU = those FLOPs / step time / the bf16 matmul peak
measured in this run (a 8192^3 torch.matmul). Swap = one client's personal state and optimiser
state written to disk from the GPU and read back onto it (what a simulated client's turn adds).
A round = 4 clients in turn on the one model: swap in, the local steps, swap out.

Without CUDA it writes no number: the result file says that no GPU was available.
`python -m benchmarks.bench_gpu --cpu-smoke` runs the same code on the CPU at a tiny shape (a
check of the code, not a benchmark; its numbers are not written to the results).
"""

from __future__ import annotations

import contextlib
import pathlib
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from benchmarks.machine import header_markdown, write_result

SHAPE = "qwen1.5-moe-a2.7b"
LENGTH = 512
BATCHES = (8, 4, 2, 1)
STEPS = 3  # timed steps per measurement, after one warm-up step
CLIENTS = 4
METHODS = (
    ("FLEx", ["method=flex"]),
    ("FedAvg, LoRA attention", ["method=fedavg", "lora.scope=attention"]),
    ("FedAvg, LoRA attention+experts", ["method=fedavg", "lora.scope=attention+experts"]),
)
MFU_TARGET = 0.40
COMMAND = ".venv/bin/flexmoe bench gpu"
TINY = dict(model_type="qwen2_moe", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
            moe_intermediate_size=32, shared_expert_intermediate_size=64, tie_word_embeddings=False)


@dataclass
class Measure:
    batch: int
    length: int
    step_seconds: float
    tokens_per_second: float
    flops_per_step: int
    mfu: float
    peak_bytes: int
    selection_seconds: float | None
    swap_seconds: float
    round_seconds: float
    clients: int


def matmul_peak(device: torch.device, size: int = 8192, repeats: int = 10) -> float:
    """Best bf16 FLOP/s of a size^3 torch.matmul on `device`."""
    from flexmoe.models.device import synchronize

    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    torch.matmul(a, b)
    best = 0.0
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        synchronize(device)
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def random_model(hf_config, device: torch.device, seed: int = 0):
    """The architecture at random initial weights, bf16, on `device` (created there directly)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16).eval()


def random_batch(batch: int, length: int, vocab: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    labels = ids.clone()
    labels[:, 0] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def measure(overrides: list[str], hf_config, device: torch.device, batch: int, length: int, steps: int,
            clients: int, peak_flops: float) -> Measure:
    """Build one method's client model on `device` and time its step, selection, swap and round."""
    from flexmoe.config import load_config
    from flexmoe.methods.build import build_method
    from flexmoe.models import graft, select_experts
    from flexmoe.models.device import peak_memory, reset_peak_memory, synchronize
    from flexmoe.train import local_train
    from flexmoe.cost.flops import counted_flops
    from flexmoe.cost.memory import TensorMemory, tensor_bytes

    config = load_config(None, [*overrides, "runtime.base_dtype=bf16", f"train.batch_size={batch}",
                                f"train.max_length={length}", f"train.local_steps={steps}"])
    method = build_method(config)
    base = random_model(hf_config, device)
    if config.runtime.quantize == "nf4":  # the fused experts at 4 bits, as load_base quantises them
        from flexmoe.models import moe_layers
        from flexmoe.models.quantize import quantize_experts

        quantize_experts(moe_layers(base))
    model = method.prepare_model(base)
    fixed = random_batch(batch, length, hf_config.vocab_size, seed=1)
    selection_seconds = None
    if method.grafts:
        calibration = [random_batch(batch, length, hf_config.vocab_size, seed=2)]
        synchronize(device)
        start = time.perf_counter()
        chosen = select_experts(model, calibration, k=config.flex.k, max_tokens=config.flex.calibration_max_tokens)
        synchronize(device)
        selection_seconds = time.perf_counter() - start
        graft(model, dict(chosen), gate=config.flex.gate, gate_init_bias=config.flex.gate_init_bias)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def train(n: int, state=None):
        cfg = config.train.model_copy(update={"local_steps": n})
        return local_train(model, params, [{}] * batch, lambda features: fixed, cfg, cfg.lr, seed=1,
                           optimizer_state=state)

    state = train(1).optimizer_state  # warm-up; its optimiser state is what a client keeps
    flops = counted_flops(lambda: train(1, state)) if device.type == "cuda" else counted_flops(lambda: train(1))
    reset_peak_memory(device)
    with TensorMemory() if device.type == "cpu" else contextlib.nullcontext() as counter:
        synchronize(device)
        start = time.perf_counter()
        state = train(steps, state).optimizer_state
        synchronize(device)
        step_seconds = (time.perf_counter() - start) / steps
    peak = peak_memory(device)
    if peak is None:  # the CPU: tensors alive before the step plus the most created in it
        peak = tensor_bytes(model.parameters()) + counter.peak
    swap = _swap_seconds(model, method, state, device)
    round_seconds = _round_seconds(train, state, swap, steps, clients, device)
    tokens = batch * length
    return Measure(batch, length, step_seconds, tokens / step_seconds, flops, flops / step_seconds / peak_flops,
                   peak, selection_seconds, swap, round_seconds, clients)


def _swap_seconds(model, method, optimizer_state: dict, device: torch.device) -> float:
    """Median time to write a client's personal + optimiser state from the device to disk and read
    it back onto the device (the files a simulated client keeps between its turns)."""
    from flexmoe.files import load_checked, save_checked
    from flexmoe.models import load_graft, save_graft
    from flexmoe.models.device import synchronize

    times = []
    with tempfile.TemporaryDirectory() as directory:
        root = pathlib.Path(directory)
        for _ in range(3):
            synchronize(device)
            start = time.perf_counter()
            if method.grafts:
                save_graft(model, root / "personal.safetensors")
            save_checked(root / "optim.safetensors", optimizer_state)
            if method.grafts:
                load_graft(model, root / "personal.safetensors", adopt_selection=True)
            back = {k: v.to(device) for k, v in load_checked(root / "optim.safetensors")[0].items()}
            synchronize(device)
            times.append(time.perf_counter() - start)
            del back
    return statistics.median(times)


def _round_seconds(train, state, swap: float, steps: int, clients: int, device) -> float:
    """Wall time of `clients` client turns on one model: the swap, then the local steps."""
    from flexmoe.models.device import synchronize

    synchronize(device)
    start = time.perf_counter()
    for _ in range(clients):
        train(steps, state)
    synchronize(device)
    return time.perf_counter() - start + clients * swap


def fitting_batch(device: torch.device, overrides: list[str]) -> int:
    """The largest batch of BATCHES whose planned peak fits in 90% of the GPU's memory."""
    from flexmoe.config import load_config
    from flexmoe.cost.plan import plan

    total = torch.cuda.get_device_properties(device).total_memory
    config = load_config(None, [*overrides, "runtime.base_dtype=bf16"])
    for batch in BATCHES:
        if plan(config, SHAPE, batch=batch, length=LENGTH, device_type="cuda").memory.peak < 0.9 * total:
            return batch
    return BATCHES[-1]


def main(results_dir: pathlib.Path) -> None:
    if not torch.cuda.is_available():
        line = (f"bench gpu: skipped: no CUDA device is available on this machine (torch {torch.__version__}, "
                f"{'CPU-only build' if torch.version.cuda is None else 'CUDA ' + torch.version.cuda}); no GPU number "
                "was measured")
        print(line)
        write_result(results_dir, "gpu", [header_markdown("GPU benchmark (Qwen1.5-MoE-A2.7B shape)", COMMAND),
                                          f"**No GPU was available**: {line.removeprefix('bench gpu: skipped: ')}.",
                                          "", "What it measures when run on a GPU:", "", __doc__.strip()], echo=False)
        return
    _run_gpu(results_dir)


def _run_gpu(results_dir: pathlib.Path) -> None:
    from flexmoe.cost.plan import hf_config

    device = torch.device("cuda", 0)
    name = torch.cuda.get_device_name(device)
    peak_flops = matmul_peak(device)
    shape = hf_config(SHAPE)
    rows = []
    for label, overrides in METHODS:
        batch = fitting_batch(device, overrides)
        m = measure(overrides, shape, device, batch, LENGTH, STEPS, CLIENTS, peak_flops)
        rows.append((label, m))
        torch.cuda.empty_cache()
    lines = [header_markdown(f"GPU benchmark (Qwen1.5-MoE-A2.7B shape) on {name}", COMMAND),
             f"- GPU: {name}, {torch.cuda.get_device_properties(device).total_memory / 2**30:.1f} GiB; "
             f"bf16 matmul peak measured in this run: {peak_flops / 1e12:.0f} TFLOP/s", "",
             __doc__.split("\n\n", 1)[1].strip(), "", *table(rows), "", *targets(rows)]
    write_result(results_dir, "gpu", lines)


def table(rows: list) -> list[str]:
    out = ["| method | batch x length | step s | tokens/s | TFLOP / step | MFU | peak GiB | selection s | swap s "
           f"| {rows[0][1].clients}-client round s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, m in rows:
        selection = "-" if m.selection_seconds is None else f"{m.selection_seconds:.2f}"
        out.append(f"| {label} | {m.batch} x {m.length} | {m.step_seconds:.3f} | {m.tokens_per_second:,.0f} | "
                   f"{m.flops_per_step / 1e12:.2f} | {m.mfu:.1%} | {m.peak_bytes / 2**30:.2f} | {selection} | "
                   f"{m.swap_seconds:.2f} | {m.round_seconds:.2f} |")
    return out


def targets(rows: list) -> list[str]:
    flex = dict(rows)["FLEx"]
    return [f"Target: FLEx step >= {MFU_TARGET:.0%} MFU: {'met' if flex.mfu >= MFU_TARGET else 'missed'} "
            f"({flex.mfu:.1%})."]


def cpu_smoke() -> list[tuple[str, Measure]]:
    """The benchmark's code on the CPU at a tiny shape (a check, not a benchmark)."""
    from transformers import AutoConfig

    fields = dict(TINY)
    shape = AutoConfig.for_model(fields.pop("model_type"), **fields)
    device = torch.device("cpu")
    peak = matmul_peak(device, size=256, repeats=2)
    return [(label, measure(overrides, shape, device, batch=2, length=32, steps=1, clients=2, peak_flops=peak))
            for label, overrides in METHODS]


if __name__ == "__main__":
    if sys.argv[1:] == ["--cpu-smoke"]:
        print("\n".join(table(cpu_smoke())))
    else:  # `python -m benchmarks gpu` (make bench, flexmoe bench gpu) is the usual way
        main(pathlib.Path(__file__).resolve().parent / "results")

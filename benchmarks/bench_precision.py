"""Does a bf16 base pay on this CPU? The evaluation passes and the local step, fp32 against bf16.

The speed issue's candidate lever: the frozen base in bf16 (CPU bf16 matmul with AMX is ~4x
fp32 here on large matrices). On the shipped tiny base and the default run config, one
intra-op thread, CPU seconds (robust to other processes on a shared machine), each
measurement taken for both variants in alternation and the minimum of `REPEATS` kept:

- knowledge: the first 300 builtin probes and 256 held-out documents (the study's sizes) in
  fp32, under bf16 autocast over the fp32 weights, and on a bf16 copy of the weights; probe
  predictions compared and per-document loss paired (bootstrap CI) against fp32;
- greedy: client 0's final evaluation sample (128 examples, 32 new tokens), fp32 against a
  bf16 copy: answers compared and per-example ROUGE-L paired;
- train step: `local_train` (5 steps, bf16 autocast, the default) of FedAvg (LoRA on
  attention) and of FLEx (grafted, as a client trains it), with the base loaded in fp32 against the base loaded in bf16
  (`runtime.base_dtype`).

A matmul-only line gives the ceiling: fp32 against bf16 `mm` at a shape of the model.
"""

from __future__ import annotations

import contextlib
import copy
import time

import torch

from benchmarks.machine import header_markdown, write_result

REPEATS = 2
COMMAND = "python -m benchmarks precision"
PROBES, DOCS, STEPS = 300, 256, 5


def _cpu(fn):
    best, result = None, None
    for _ in range(REPEATS):
        start = time.process_time()
        result = fn()
        spent = time.process_time() - start
        best = spent if best is None else min(best, spent)
    return result, best


def _matmul_ceiling() -> list[str]:
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(1024, 256, dtype=dtype), torch.randn(256, 640, dtype=dtype)
        _, seconds = _cpu(lambda: [a @ b for _ in range(200)])
        out.append(2 * 1024 * 256 * 640 * 200 / seconds / 1e9)
    return [f"Matmul ceiling (1024x256 @ 256x640): fp32 {out[0]:.0f} GFLOP/s, bf16 {out[1]:.0f} GFLOP/s "
            f"({out[1] / out[0]:.1f}x).", ""]


def _knowledge(config, model, tokenizer) -> list[str]:
    from flexmoe.data.builtin import builtin_corpus, builtin_probes
    from flexmoe.eval.knowledge import document_nll, probe_predictions
    from flexmoe.analysis.stats import paired_difference

    probes, docs = builtin_probes()[:PROBES], builtin_corpus("heldout")[:DOCS]
    bf16_copy = copy.deepcopy(model).to(torch.bfloat16)
    variants = {"fp32": (model, contextlib.nullcontext), "bf16 autocast": (model, _autocast),
                "bf16 weights": (bf16_copy, contextlib.nullcontext)}
    results = {}
    for label, (m, context) in variants.items():
        def probes_pass(m=m, context=context):
            with context():
                return probe_predictions(m, tokenizer, probes)

        def docs_pass(m=m, context=context):
            with context():
                return document_nll(m, tokenizer, docs, config.eval.knowledge_max_length, config.eval.batch_size)

        results[label] = (_cpu(probes_pass), _cpu(docs_pass))
    (ref_pred, ref_p_s), (ref_nll, ref_d_s) = results["fp32"]
    lines = ["## Knowledge passes (300 probes, 256 held-out documents)", "",
             "| variant | probes CPU s | speed-up | documents CPU s | speed-up | probe accuracy | "
             "same prediction | doc loss − fp32 (nats/token) [95% CI] |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for label, ((pred, p_s), (nll, d_s)) in results.items():
        accuracy = sum(p == probe.answer for p, probe in zip(pred, probes)) / len(probes)
        same = sum(a == b for a, b in zip(pred, ref_pred)) / len(pred)
        per_token = [n / max(c, 1) for n, c in nll]
        ref_per_token = [n / max(c, 1) for n, c in ref_nll]
        d = paired_difference({(0, 0): (per_token, ref_per_token)})
        lines.append(f"| {label} | {p_s:.2f} | {ref_p_s / p_s:.2f}x | {d_s:.2f} | {ref_d_s / d_s:.2f}x | "
                     f"{accuracy:.3f} | {same:.1%} | {d.diff:+.5f} [{d.ci_low:+.5f}, {d.ci_high:+.5f}] |")
    return lines + [""]


def _autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _greedy(config, model, tokenizer) -> list[str]:
    from flexmoe.clients import partition_data
    from flexmoe.eval.detail import eval_sample
    from flexmoe.eval.rouge import generate_responses, rouge_l
    from flexmoe.analysis.stats import paired_difference

    examples = eval_sample(config, 0, partition_data(config)[0].test, config.rounds)
    references = [e.response for e in examples]

    def answers(m):
        return generate_responses(m, tokenizer, examples, template=config.data.template,
                                  max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size,
                                  max_prompt_length=config.train.max_length)

    bf16_copy = copy.deepcopy(model).to(torch.bfloat16)
    (fp32, fp32_s), (bf16, bf16_s) = _cpu(lambda: answers(model)), _cpu(lambda: answers(bf16_copy))
    d = paired_difference({(0, 0): (rouge_l(bf16, references), rouge_l(fp32, references))})
    same = sum(a == b for a, b in zip(fp32, bf16))
    return ["## Greedy answers (client 0, 128 examples)", "",
            "| variant | CPU s | speed-up | same answer | ROUGE-L − fp32 [95% CI] |", "|---|---:|---:|---:|---|",
            f"| fp32 | {fp32_s:.2f} | 1.00x | {len(fp32)}/{len(fp32)} | |",
            f"| bf16 weights | {bf16_s:.2f} | {fp32_s / bf16_s:.2f}x | {same}/{len(fp32)} | "
            f"{d.diff:+.4f} [{d.ci_low:+.4f}, {d.ci_high:+.4f}] |", ""]


def _train_step(method_name: str, base_dtype: str) -> float:
    from benchmarks.bench_train import Setup  # the engine's model, grafted for FLEx, on client 0

    setup = Setup(["runtime.threads=1", f"method={method_name}", f"runtime.base_dtype={base_dtype}"])
    setup.train("bf16", 1)  # warm-up: first-call allocations, kernel selection
    return _cpu(lambda: setup.train("bf16", STEPS))[1] / STEPS


def _training() -> list[str]:
    lines = ["## Local training step (batch 8, max length 256, bf16 autocast)", "",
             "| method | base fp32: CPU s/step | base bf16: CPU s/step | fp32 / bf16 |", "|---|---:|---:|---:|"]
    for method_name in ("fedavg", "flex"):
        fp32, bf16 = _train_step(method_name, "fp32"), _train_step(method_name, "bf16")
        lines.append(f"| {method_name} | {fp32:.3f} | {bf16:.3f} | {fp32 / bf16:.2f}x |")
    return lines + [""]


def main(results_dir) -> None:
    torch.set_num_threads(1)
    from flexmoe.config import load_config
    from flexmoe.engine.model import load_model
    from flexmoe.methods.build import build_method

    config = load_config(None, ["runtime.threads=1"])
    model, tokenizer = load_model(config, build_method(config))
    lines = [header_markdown("Precision: fp32 against bf16 on the CPU, evaluation and training", COMMAND),
             __doc__.split("\n\n", 1)[1].strip(), ""]
    lines += _matmul_ceiling() + _knowledge(config, model, tokenizer) + _greedy(config, model, tokenizer) + _training()
    write_result(results_dir, "precision", lines)

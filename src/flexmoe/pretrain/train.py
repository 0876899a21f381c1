"""Pretraining of the shipped tiny qwen2_moe model (`flexmoe pretrain`).

One config file (configs/pretrain-tiny-v1.toml, then configs/pretrain-tiny.toml continuing it) fixes everything: the corpus, the BPE tokenizer,
the architecture, the optimisation schedule and the seed. The output is a standard Hugging Face
model directory (config.json, model.safetensors, tokenizer files) that loads offline.

Documents are packed as `<|bos|> text <|eos|>` back to back into fixed-length sequences, so no
token is padding. The batch at step s is a pure function of (seed, s): a crashed run resumes from
its last checkpoint and ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from flexmoe.errors import FlexmoeError
from flexmoe.files import write_atomic, write_text_atomic
from flexmoe.pretrain.config import CHECKPOINT, CONFIG_COPY, DOMAIN_EXPERTS, PretrainConfig, TRAIN_LOG, TRAIN_SUMMARY, config_to_toml, same_config
from flexmoe.pretrain.packing import assign_domain_experts, read_documents, row_targets, train_tokenizer, training_batches
from flexmoe.pretrain.step import build_model, init_dir, make_optimizer, train_step, training_device


def pretrain(config: PretrainConfig, output: str | Path, resume: bool = False,
             log=print, time_limit_s: float | None = None) -> Path:
    """Train the tokenizer and model of `config` into `output` (an HF model dir); returns it.

    A checkpoint is written every `checkpoint_every` steps; `resume=True` continues from it.
    With `time_limit_s`, training stops at the first step boundary after that many seconds,
    leaving a checkpoint (and no model files) for a later `resume=True`.
    """
    started = time.time()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    device = training_device(config.train.device)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    torch.manual_seed(config.seed)
    if resume:
        _check_resumable(config, output)
    tokenizer = _tokenizer_for(config, output, resume, log)
    train_docs = read_documents(config.data.corpus, "train")
    rows, row_domains, picks_for_step = training_batches(train_docs, tokenizer, config.train, config.seed)
    targets = None
    if config.train.router_supervision_coef:
        mapping = assign_domain_experts(row_domains, config.model.num_experts)
        write_text_atomic(output / DOMAIN_EXPERTS, json.dumps(mapping, indent=1) + "\n")
        targets = row_targets(row_domains, mapping)
        log(f"router supervision: {len(mapping)} domains onto {config.model.num_experts} experts ({DOMAIN_EXPERTS})")

    def batch_for_step(step: int):
        picks = picks_for_step(step)
        return rows[picks], None if targets is None else targets[picks]
    heldout_docs = read_documents(config.data.heldout, "heldout")[: config.train.eval_docs]
    log(f"corpus: {len(train_docs)} documents, {rows.numel()} tokens in {rows.shape[0]} rows "
        f"of {config.train.seq_len} (domain grouping: {config.train.domain_grouping}); vocab {len(tokenizer)}")

    model = build_model(config.model, tokenizer, config.seed).to(device)
    if config.train.experts_implementation:
        model.config._experts_implementation = config.train.experts_implementation  # not serialised
    optimizer = make_optimizer(model, config.train)
    state = _load_checkpoint(output, model, optimizer) if resume else {"step": 0, "seconds": 0.0}
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}; "
        f"starting at step {state['step']} of {config.train.steps}")
    deadline = None if time_limit_s is None else started + time_limit_s
    if not _train_loop(model, optimizer, batch_for_step, heldout_docs, tokenizer, config, output, state, log,
                       deadline):
        _save_checkpoint(output, model, optimizer, state)
        log(f"time limit reached: stopped at step {state['step']} of {config.train.steps}; "
            f"checkpoint in {output / CHECKPOINT} (continue with --resume)")
        return output
    _save_model(model, tokenizer, output)
    _write_summary(output, config, rows, state, train_docs, device)
    (output / CHECKPOINT).unlink(missing_ok=True)
    return output


def _check_resumable(config: PretrainConfig, output: Path) -> None:
    """A run resumes only from its own checkpoint, under exactly the config it started with."""
    if not (output / CHECKPOINT).is_file():
        raise FlexmoeError(f"--resume: no checkpoint at {output / CHECKPOINT}")
    stored = output / CONFIG_COPY
    if not same_config(stored, config):  # compared as configs, not as text: a copy written by an earlier writer resumes
        raise FlexmoeError(f"--resume: the config differs from the one {output} was started with ({stored})")


def _tokenizer_for(config: PretrainConfig, output: Path, resume: bool, log):
    from transformers import AutoTokenizer

    if resume and (output / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(output, local_files_only=True)
    if config.model.init_from:  # continued training keeps the vocabulary it was trained with
        tokenizer = AutoTokenizer.from_pretrained(init_dir(config.model), local_files_only=True)
        tokenizer.save_pretrained(output)
        (output / CONFIG_COPY).write_text(config_to_toml(config), encoding="utf-8")
        log(f"tokenizer: vocab {len(tokenizer)} from {config.model.init_from}")
        return tokenizer
    started = time.time()
    tokenizer = train_tokenizer(read_documents(config.data.corpus, "train"), config.tokenizer)
    tokenizer.save_pretrained(output)
    (output / CONFIG_COPY).write_text(config_to_toml(config), encoding="utf-8")
    log(f"tokenizer: BPE vocab {len(tokenizer)} trained in {time.time() - started:.1f}s")
    return tokenizer


def _train_loop(model, optimizer, batch_for_step, heldout_docs, tokenizer, config, output, state, log,
                deadline: float | None = None) -> bool:
    """Train from state["step"]; False when the deadline stopped it before the last step."""
    from flexmoe.eval.knowledge import heldout_loss

    settings = config.train
    model.train()
    window_start, window_tokens = time.time(), 0
    for step in range(state["step"], settings.steps):
        if deadline is not None and time.time() > deadline:
            model.eval()
            return False
        step_start = time.time()
        batch, batch_targets = batch_for_step(step)
        metrics = train_step(model, optimizer, batch, step, settings, batch_targets)
        state["seconds"] += time.time() - step_start
        state["step"] = step + 1
        window_tokens += settings.batch_size * settings.seq_len
        done = state["step"] == settings.steps
        if state["step"] % settings.log_every == 0 or done:
            metrics.update(step=state["step"], tokens_per_s=window_tokens / (time.time() - window_start),
                           train_seconds=round(state["seconds"], 1))
            if settings.eval_every and (state["step"] % settings.eval_every == 0 or done):
                model.eval()
                metrics["heldout_loss"] = heldout_loss(model, tokenizer, heldout_docs, max_length=settings.seq_len)
                model.train()
            _append_log(output, metrics)
            log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
            window_start, window_tokens = time.time(), 0
        if state["step"] % settings.checkpoint_every == 0 and not done:
            _save_checkpoint(output, model, optimizer, state)
    model.eval()
    return True


def _append_log(output: Path, metrics: dict) -> None:
    with open(output / TRAIN_LOG, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(metrics) + "\n")


def _save_checkpoint(output: Path, model, optimizer, state: dict) -> None:
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": dict(state)}
    write_atomic(output / CHECKPOINT, lambda tmp: torch.save(checkpoint, tmp))


def _load_checkpoint(output: Path, model, optimizer) -> dict:
    checkpoint = torch.load(output / CHECKPOINT, weights_only=True, map_location="cpu")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    return checkpoint["state"]


def _save_model(model, tokenizer, output: Path) -> None:
    """Write bf16 weights + config + tokenizer to a scratch dir, then move each file into place."""
    scratch = output / ".saving"
    shutil.rmtree(scratch, ignore_errors=True)
    model.config.use_cache = True
    model.to(torch.bfloat16).save_pretrained(scratch)  # bf16 storage halves the shipped size
    model.to(torch.float32)
    tokenizer.save_pretrained(scratch)
    for item in scratch.iterdir():
        os.replace(item, output / item.name)
    scratch.rmdir()


def _write_summary(output: Path, config: PretrainConfig, rows, state: dict, train_docs,
                   device: torch.device) -> None:
    tokens = config.train.steps * config.train.batch_size * config.train.seq_len
    summary = {
        "steps": config.train.steps,
        "tokens_seen": tokens,
        "corpus_tokens": rows.numel(),
        "corpus_documents": len(train_docs),
        "epochs": round(tokens / rows.numel(), 2),
        "train_seconds": round(state["seconds"], 1),
        "tokens_per_second": round(tokens / max(state["seconds"], 1e-9), 1),
        "precision": config.train.precision,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "domain_grouping": config.train.domain_grouping,
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    write_text_atomic(output / TRAIN_SUMMARY, json.dumps(summary, indent=2) + "\n")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"

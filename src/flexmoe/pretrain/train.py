"""Pretraining of the shipped tiny qwen2_moe model (`flexmoe pretrain`).

One config file (configs/pretrain-tiny-v1.toml, then configs/pretrain-tiny.toml continuing it) fixes everything: the corpus, the BPE tokenizer,
the architecture, the optimisation schedule and the seed. The output is a standard Hugging Face
model directory (config.json, model.safetensors, tokenizer files) that loads offline.

Documents are packed as `<|bos|> text <|eos|>` back to back into fixed-length sequences, so no
token is padding. The batch at step s is a pure function of (seed, s): a crashed run resumes from
its last checkpoint and ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
import re
import shutil
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flexmoe.config import parse_override, set_dotted
from flexmoe.errors import FlexmoeError
from flexmoe.files import write_atomic, write_text_atomic
from flexmoe.models.device import resolve_device

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [PAD, BOS, EOS]  # ids 0, 1, 2
CHECKPOINT = "checkpoint.pt"
TRAIN_LOG = "train_log.jsonl"
TRAIN_SUMMARY = "training_summary.json"
CONFIG_COPY = "pretrain-config.toml"
DOMAIN_EXPERTS = "domain_experts.json"  # the router supervision's domain -> expert assignment
DEVICES = ("auto", "cpu", "cuda")
DOMAIN_GROUPINGS = ("none", "sequences", "batches")
EXPERTS_IMPLEMENTATIONS = ("", "grouped_mm", "eager")
MIXED = "mixed"  # the group of sequences packed from the tails of every domain
# "dog (noun, animal): ..." -> noun.animal ; "happy (adjective): ..." -> adjective
_DOMAIN = re.compile(r"^[^()]*\((\w+)(?:, (\w+))?[^)]*\):")


@dataclass(frozen=True)
class DataSettings:
    corpus: str = "builtin"  # "builtin" or a UTF-8 text file with one document per line
    heldout: str = "builtin"
    probes: str = "builtin"  # "builtin" or "none"


@dataclass(frozen=True)
class TokenizerSettings:
    vocab_size: int = 6144
    min_frequency: int = 2


@dataclass(frozen=True)
class ModelSettings:
    # A model directory to continue from (its weights and tokenizer; the settings below must
    # match its config). "" = a fresh initialisation. Continued training is how the shipped base
    # gets experts that specialise: an existing base, its routers supervised toward domain experts.
    init_from: str = ""
    num_hidden_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 320
    shared_expert_intermediate_size: int = 640
    max_position_embeddings: int = 512
    norm_topk_prob: bool = False
    router_aux_loss_coef: float = 0.01
    initializer_range: float = 0.02


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "bf16"  # "bf16" (autocast) or "fp32"
    device: str = "auto"  # "auto" (cuda when torch sees a GPU), "cpu" or "cuda"
    # How documents are grouped by WordNet domain (lexicographer file, e.g. noun.animal):
    # "none" packs all shuffled documents into one stream; "sequences" packs each domain's
    # documents into its own sequences (batches mix domains); "batches" also draws every batch
    # from one domain. The router's load-balancing loss is computed per batch, so with
    # "batches" it asks each domain (not the whole corpus) for an even use of the experts.
    domain_grouping: str = "none"
    router_z_loss_coef: float = 0.0  # ST-MoE router z-loss: mean squared logsumexp of router logits
    # Router supervision (DEMix-like, annealed): every domain is assigned one expert (the largest
    # domains first, each to the expert with the fewest rows so far), and a cross-entropy term
    # pulls each router, in every layer, toward its row's domain expert. Its weight falls linearly
    # from router_supervision_coef to 0 at router_supervision_until x steps; the learned router
    # alone decides after that. Needs domain_grouping "sequences" or "batches" (rows of one domain).
    router_supervision_coef: float = 0.0
    router_supervision_until: float = 0.5
    # transformers' fused-experts kernel while training: "" = its default (grouped_mm), or "eager"
    # (a loop over experts: slower, the fallback if grouped_mm fails on a machine); not saved with the model
    experts_implementation: str = ""
    log_every: int = 10
    eval_every: int = 250
    eval_docs: int = 300
    checkpoint_every: int = 100
    threads: int = 1  # torch CPU threads; 0 = torch's default. One thread degrades least on a shared CPU


@dataclass(frozen=True)
class EvalSettings:
    heldout_max_length: int = 256
    batch_size: int = 32
    generation_prompts: tuple[str, ...] = ("dog (noun, animal):", "violin (noun, artifact):",
                                           "run (verb, motion):", "happy (adjective):")
    max_new_tokens: int = 32
    graft_docs: int = 64  # held-out documents per domain that calibrate the grafting measurement
    # targets the card reports as met or missed (0 = no target)
    target_perplexity: float = 0.0  # held-out perplexity at most this
    target_probe_accuracy: float = 0.40  # probe accuracy (bytes-normalised) at least this
    target_domain_tv: float = 0.0  # mean pairwise TV distance of domains' expert loads, in most layers


@dataclass(frozen=True)
class PretrainConfig:
    seed: int = 0
    data: DataSettings = field(default_factory=DataSettings)
    tokenizer: TokenizerSettings = field(default_factory=TokenizerSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)


# ---------------------------------------------------------------- config

def load_config(path: str | Path | None, overrides: list[str] = ()) -> PretrainConfig:
    """Read a pretrain TOML file (None = all defaults) and apply `section.key=value` overrides."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise FlexmoeError(f"cannot read pretrain config {path}: {err.strerror}") from None
        except tomllib.TOMLDecodeError as err:
            raise FlexmoeError(f"{path}: invalid TOML ({err})") from None
    for item in overrides:
        _apply_override(raw, item)
    return _build(PretrainConfig, raw, where=str(path or "defaults"))


def _apply_override(raw: dict, item: str) -> None:
    key, value = parse_override(item)  # the same `--set` syntax as `flexmoe run`
    set_dotted(raw, key, value)


def _build(cls, raw: dict, where: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in known:
            raise FlexmoeError(f"{where}: unknown key {key!r} (valid: {', '.join(known)})")
        default = known[key].default_factory() if known[key].default_factory is not dataclasses.MISSING \
            else known[key].default
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise FlexmoeError(f"{where}: [{key}] must be a table")
            values[key] = _build(type(default), value, f"{where} [{key}]")
        else:
            values[key] = _coerce(value, default, f"{where}: key {key!r}")
    config = cls(**values)
    _validate(config, where)
    return config


def _coerce(value, default, where: str):
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, tuple):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise FlexmoeError(f"{where} must be {type(default).__name__}, got {value!r}")
    return value


def _validate(config, where: str) -> None:
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise FlexmoeError(f"{where}: key {f.name!r} must not be negative, got {value}")
    if isinstance(config, TrainSettings):
        if config.precision not in ("bf16", "fp32"):
            raise FlexmoeError(f"{where}: precision must be 'bf16' or 'fp32', got {config.precision!r}")
        if config.device not in DEVICES:
            raise FlexmoeError(f"{where}: device must be one of {', '.join(DEVICES)}, got {config.device!r}")
        if config.experts_implementation not in EXPERTS_IMPLEMENTATIONS:
            raise FlexmoeError(f"{where}: experts_implementation must be one of "
                               f"{', '.join(map(repr, EXPERTS_IMPLEMENTATIONS))}, got {config.experts_implementation!r}")
        if config.domain_grouping not in DOMAIN_GROUPINGS:
            raise FlexmoeError(f"{where}: domain_grouping must be one of {', '.join(DOMAIN_GROUPINGS)}, "
                               f"got {config.domain_grouping!r}")
        if config.router_supervision_coef and config.domain_grouping == "none":
            raise FlexmoeError(f"{where}: router_supervision_coef needs domain_grouping 'sequences' or 'batches' "
                               "(supervision targets come from the domain of each packed row)")
        if not 0 < config.router_supervision_until <= 1:
            raise FlexmoeError(f"{where}: router_supervision_until must be in (0, 1], got "
                               f"{config.router_supervision_until}")
        if min(config.steps, config.batch_size, config.seq_len) < 1:
            raise FlexmoeError(f"{where}: steps, batch_size and seq_len must be at least 1")
    if isinstance(config, ModelSettings):
        if config.hidden_size % config.num_attention_heads:
            raise FlexmoeError(f"{where}: hidden_size must be a multiple of num_attention_heads")
        if not 1 <= config.num_experts_per_tok <= config.num_experts:
            raise FlexmoeError(f"{where}: num_experts_per_tok must be in 1..num_experts")
    if isinstance(config, TokenizerSettings) and config.vocab_size < 300:
        raise FlexmoeError(f"{where}: vocab_size must be at least 300 (256 bytes + specials + merges)")


def config_to_toml(config: PretrainConfig) -> str:
    """The resolved config as TOML (stored next to the model so it can be re-run)."""
    lines = [f"seed = {config.seed}"]
    for section in ("data", "tokenizer", "model", "train", "eval"):
        lines.append(f"\n[{section}]")
        for key, value in dataclasses.asdict(getattr(config, section)).items():
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


# ---------------------------------------------------------------- data

def read_documents(source: str, split: str) -> list[str]:
    """Documents of `source`: the builtin WordNet corpus split, or one document per line of a file."""
    if source == "builtin":
        from flexmoe.data import builtin_corpus
        return builtin_corpus(split)
    path = Path(source)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise FlexmoeError(f"cannot read corpus file {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise FlexmoeError(f"corpus file {path} is not UTF-8 text") from None
    documents = [line.strip() for line in lines if line.strip()]
    if not documents:
        raise FlexmoeError(f"corpus file {path} has no documents (one per line expected)")
    return documents


def train_tokenizer(documents: list[str], settings: TokenizerSettings):
    """Byte-level BPE trained on `documents`, wrapped as a Hugging Face fast tokenizer.

    Byte-level means any text encodes without an unknown token. Encoding prepends <|bos|>, as
    every pretraining document starts with it, so prompts in fine-tuning, evaluation and
    generation look like the text the model learned; code that builds sequences itself (packing,
    scoring) passes `add_special_tokens=False`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=settings.vocab_size, min_frequency=settings.min_frequency,
        special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False)
    tokenizer.train_from_iterator(documents, trainer=trainer)
    bos = (BOS, tokenizer.token_to_id(BOS))
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                             special_tokens=[bos])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, model_max_length=1 << 30)


def pack_documents(documents: list[str], tokenizer, seq_len: int, seed: int) -> torch.Tensor:
    """Shuffle documents (seeded), encode each as bos + text + eos, cut the stream into rows."""
    order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(seed)).tolist()
    encoded = tokenizer([documents[i] for i in order], add_special_tokens=False)["input_ids"]
    stream = [token for ids in encoded for token in (tokenizer.bos_token_id, *ids, tokenizer.eos_token_id)]
    rows = len(stream) // seq_len
    if rows == 0:
        raise FlexmoeError(f"the corpus has {len(stream)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(stream[: rows * seq_len], dtype=torch.long).view(rows, seq_len)


def document_domain(text: str) -> str:
    """The WordNet part of speech and lexicographer file a corpus document starts with."""
    match = _DOMAIN.match(text)
    if not match:
        return "other"
    return f"{match.group(1)}.{match.group(2)}" if match.group(2) else match.group(1)


def pack_by_domain(documents: list[str], tokenizer, seq_len: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Pack each domain's documents into sequences of their own -> (rows, the domain of each row).

    A domain's last, incomplete sequence is not padded: the tails of all domains are packed
    together into sequences of the group `MIXED`, so no document is lost (but the last tail).
    """
    groups: dict[str, list[str]] = {}
    for doc in documents:
        groups.setdefault(document_domain(doc), []).append(doc)
    rows, names, tails = [], [], []
    for index, domain in enumerate(sorted(groups)):
        stream = _token_stream(groups[domain], tokenizer, seed + index)
        full = len(stream) // seq_len * seq_len
        rows += [stream[start:start + seq_len] for start in range(0, full, seq_len)]
        names += [domain] * (full // seq_len)
        tails += stream[full:]
    rows += [tails[start:start + seq_len] for start in range(0, len(tails) // seq_len * seq_len, seq_len)]
    names += [MIXED] * (len(rows) - len(names))
    if not rows:
        raise FlexmoeError(f"the corpus has {len(tails)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(rows, dtype=torch.long), names


def _token_stream(documents: list[str], tokenizer, seed: int) -> list[int]:
    """Documents in a seeded order, each as bos + text + eos, back to back."""
    order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(seed)).tolist()
    encoded = tokenizer([documents[i] for i in order], add_special_tokens=False)["input_ids"]
    return [token for ids in encoded for token in (tokenizer.bos_token_id, *ids, tokenizer.eos_token_id)]


def domain_batch_at(row_domains: list[str], step: int, batch_size: int, seed: int) -> list[int]:
    """Row indices of step `step` when every batch comes from one domain; a pure function of step.

    Each epoch shuffles every domain's rows and cuts them into batches; the rows left over
    (fewer than a batch per domain) form mixed batches of their own; then the batches are shuffled.
    """
    plan = _domain_epoch_plan(tuple(row_domains), batch_size, seed, epoch=0)
    epoch, index = divmod(step, len(plan))
    return _domain_epoch_plan(tuple(row_domains), batch_size, seed, epoch)[index]


@functools.lru_cache(maxsize=4)
def _domain_epoch_plan(row_domains: tuple[str, ...], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch + 1)
    by_domain: dict[str, list[int]] = {}
    for index, domain in enumerate(row_domains):
        by_domain.setdefault(domain, []).append(index)
    batches, leftovers = [], []
    for domain in sorted(by_domain):
        indices = by_domain[domain]
        shuffled = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
        full = len(shuffled) // batch_size * batch_size
        batches += [shuffled[start:start + batch_size] for start in range(0, full, batch_size)]
        leftovers += shuffled[full:]
    leftovers = [leftovers[i] for i in torch.randperm(len(leftovers), generator=generator).tolist()]
    batches += [leftovers[start:start + batch_size]
                for start in range(0, len(leftovers) // batch_size * batch_size, batch_size)]
    if not batches:
        raise FlexmoeError(f"the corpus has {len(row_domains)} sequences, fewer than one batch of {batch_size}")
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def training_batches(documents: list[str], tokenizer, settings: TrainSettings, seed: int):
    """(rows, row_domains, picks_for_step) for the configured domain grouping.

    picks_for_step(step) -> the row indices of that step's batch (a pure function of step);
    row_domains is None when documents are not grouped by domain.
    """
    if settings.domain_grouping == "none":
        rows = pack_documents(documents, tokenizer, settings.seq_len, seed)
        return rows, None, lambda step: batch_picks(rows.shape[0], step, settings.batch_size, seed)
    rows, row_domains = pack_by_domain(documents, tokenizer, settings.seq_len, seed)
    if settings.domain_grouping == "sequences":
        return rows, row_domains, lambda step: batch_picks(rows.shape[0], step, settings.batch_size, seed)
    return rows, row_domains, lambda step: torch.tensor(domain_batch_at(row_domains, step, settings.batch_size, seed))


def assign_domain_experts(row_domains: list[str], num_experts: int) -> dict[str, int]:
    """Each domain's supervision expert: largest domains first, each to the least-filled expert.

    So the `num_experts` largest domains get distinct experts, and the expert loads stay balanced
    in rows. The `MIXED` rows (tails of several domains) get none.
    """
    counts: dict[str, int] = {}
    for domain in row_domains:
        if domain != MIXED:
            counts[domain] = counts.get(domain, 0) + 1
    fill = [0] * num_experts
    mapping = {}
    for domain in sorted(counts, key=lambda d: (-counts[d], d)):
        expert = min(range(num_experts), key=lambda e: (fill[e], e))
        mapping[domain] = expert
        fill[expert] += counts[domain]
    return mapping


def row_targets(row_domains: list[str], mapping: dict[str, int]) -> torch.Tensor:
    """The supervision expert of each row (-1 = no supervision)."""
    return torch.tensor([mapping.get(domain, -1) for domain in row_domains], dtype=torch.long)


def supervision_weight(step: int, settings: TrainSettings) -> float:
    """router_supervision_coef, falling linearly to 0 at router_supervision_until of the steps."""
    end = settings.router_supervision_until * settings.steps
    return settings.router_supervision_coef * max(0.0, 1.0 - step / end)


def router_supervision_loss(router_logits, targets: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Mean over layers of the cross-entropy between each token's router and its row's expert."""
    token_targets = targets.repeat_interleave(seq_len)
    return torch.stack([torch.nn.functional.cross_entropy(logits.float(), token_targets.to(logits.device),
                                                          ignore_index=-1)
                        for logits in router_logits]).mean()


def batch_picks(n: int, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """Row indices for optimiser step `step`: epoch-wise seeded permutations, a pure function of step."""
    picks = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, index = divmod(position, n)
        picks.append(_epoch_order(n, seed, epoch)[index])
    return torch.tensor(picks)


_ORDER_CACHE: dict[tuple[int, int, int], list[int]] = {}


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    key = (n, seed, epoch)
    if key not in _ORDER_CACHE:
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch + 1)
        _ORDER_CACHE[key] = torch.randperm(n, generator=generator).tolist()
    return _ORDER_CACHE[key]


# ---------------------------------------------------------------- model

def build_model(settings: ModelSettings, tokenizer, seed: int):
    """A qwen2_moe causal LM: every layer sparse, gated shared expert, tied embeddings; freshly
    initialised, or the float32 weights of `settings.init_from`."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    if settings.init_from:
        return _continued_model(settings)

    config = Qwen2MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.shared_expert_intermediate_size,  # unused: no dense layer
        num_hidden_layers=settings.num_hidden_layers,
        num_attention_heads=settings.num_attention_heads,
        num_key_value_heads=settings.num_key_value_heads,
        max_position_embeddings=settings.max_position_embeddings,
        num_experts=settings.num_experts,
        num_experts_per_tok=settings.num_experts_per_tok,
        moe_intermediate_size=settings.moe_intermediate_size,
        shared_expert_intermediate_size=settings.shared_expert_intermediate_size,
        norm_topk_prob=settings.norm_topk_prob,
        router_aux_loss_coef=settings.router_aux_loss_coef,
        initializer_range=settings.initializer_range,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        tie_word_embeddings=True,
        qkv_bias=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return Qwen2MoeForCausalLM(config)


def _continued_model(settings: ModelSettings):
    from transformers import Qwen2MoeForCausalLM

    path = _init_dir(settings)
    model = Qwen2MoeForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    for key, value in dataclasses.asdict(settings).items():
        if key != "init_from" and getattr(model.config, key, value) != value:
            raise FlexmoeError(f"model.init_from: {path} has {key} = {getattr(model.config, key)!r}, "
                               f"the config says {value!r}")
    model.config.router_aux_loss_coef = settings.router_aux_loss_coef
    return model


def _init_dir(settings: ModelSettings) -> Path:
    path = Path(settings.init_from)
    if not (path / "config.json").is_file() or not (path / "tokenizer.json").is_file():
        raise FlexmoeError(f"model.init_from: no model directory at {path} (config.json or tokenizer.json missing)")
    return path


def lr_factor(step: int, settings: TrainSettings) -> float:
    """Linear warm-up to 1, then cosine decay to min_lr_ratio at the last step."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    span = max(1, settings.steps - settings.warmup_steps)
    progress = min(1.0, (step - settings.warmup_steps) / span)
    return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model, settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and expert tensors only, not on norms, biases or embeddings."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if param.ndim >= 2 and "embed" not in name else no_decay).append(param)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr, betas=(settings.beta1, settings.beta2))


def training_device(name: str) -> torch.device:
    """The torch device for `train.device`, resolved as a run's `runtime.device` is (`resolve_device`)."""
    device = resolve_device(name, key="train.device")
    if device.type == "cuda":
        # float32 matmuls as TF32: transformers runs the fused experts in the weights' dtype (float32
        # master weights), outside autocast
        torch.set_float32_matmul_precision("high")
    return device


def router_z_loss(router_logits) -> torch.Tensor:
    """ST-MoE's router z-loss (Zoph et al. 2022): mean over layers and tokens of logsumexp(logits)²."""
    return torch.stack([torch.logsumexp(logits.float(), dim=-1).square().mean() for logits in router_logits]).mean()


def train_step(model, optimizer, batch: torch.Tensor, step: int, settings: TrainSettings,
               targets: torch.Tensor | None = None) -> dict:
    """One optimiser step on LM loss + router load-balancing loss (+ z-loss, + router supervision
    toward `targets`, one expert per row); returns the step's metrics."""
    for group in optimizer.param_groups:
        group["lr"] = settings.lr * lr_factor(step, settings)
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.precision == "bf16"):
        out = model(input_ids=batch.to(device), labels=batch.to(device), output_router_logits=True)
    loss = out.loss  # transformers already added router_aux_loss_coef * aux_loss
    metrics = {}
    if settings.router_z_loss_coef:
        z_loss = router_z_loss(out.router_logits)
        loss = loss + settings.router_z_loss_coef * z_loss
        metrics["z_loss"] = float(z_loss.detach())
    weight = supervision_weight(step, settings) if targets is not None else 0.0
    if weight:
        supervision = router_supervision_loss(out.router_logits, targets, batch.shape[1])
        loss = loss + weight * supervision
        metrics.update(supervision_loss=float(supervision.detach()), supervision_weight=weight)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    aux = float(out.aux_loss.detach())
    return {"loss": float(out.loss.detach()) - model.config.router_aux_loss_coef * aux, "aux_loss": aux,
            **metrics, "grad_norm": float(grad_norm), "lr": optimizer.param_groups[0]["lr"]}


# ---------------------------------------------------------------- run

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
    if not stored.is_file() or stored.read_text(encoding="utf-8") != config_to_toml(config):
        raise FlexmoeError(f"--resume: the config differs from the one {output} was started with ({stored})")


def _tokenizer_for(config: PretrainConfig, output: Path, resume: bool, log):
    from transformers import AutoTokenizer

    if resume and (output / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(output, local_files_only=True)
    if config.model.init_from:  # continued training keeps the vocabulary it was trained with
        tokenizer = AutoTokenizer.from_pretrained(_init_dir(config.model), local_files_only=True)
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

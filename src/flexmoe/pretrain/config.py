"""The `flexmoe pretrain` config: its sections (data, tokenizer, model, train, eval) as frozen
dataclasses, read from TOML with `--set` overrides, validated, and written back as TOML."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from flexmoe.config import parse_override, set_dotted
from flexmoe.errors import FlexmoeError


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

"""The `flexmoe pretrain` config: its sections (data, tokenizer, model, train, eval), on the same
machinery as a run's config (`flexmoe.settings`): read from TOML with `--set` overrides, validated
with the same one-line errors, and written back as TOML."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from flexmoe.errors import FlexmoeError
from flexmoe.settings import DEVICE_PATTERN, Section, load, to_toml


BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


SPECIAL_TOKENS = [PAD, BOS, EOS]  # ids 0, 1, 2


CHECKPOINT = "checkpoint.pt"


TRAIN_LOG = "train_log.jsonl"


TRAIN_SUMMARY = "training_summary.json"


CONFIG_COPY = "pretrain-config.toml"


DOMAIN_EXPERTS = "domain_experts.json"  # the router supervision's domain -> expert assignment


PRECISIONS = ("bf16", "fp32")


DOMAIN_GROUPINGS = ("none", "sequences", "batches")


EXPERTS_IMPLEMENTATIONS = ("", "grouped_mm", "eager")


MIXED = "mixed"  # the group of sequences packed from the tails of every domain


class DataSettings(Section):
    corpus: str = "builtin"  # "builtin" or a UTF-8 text file with one document per line
    heldout: str = "builtin"
    probes: str = "builtin"  # "builtin" or "none"


class TokenizerSettings(Section):
    vocab_size: int = Field(6144, ge=300)  # at least 256 bytes + specials + merges
    min_frequency: int = Field(2, ge=0)


class ModelSettings(Section):
    # A model directory to continue from (its weights and tokenizer; the settings below must
    # match its config). "" = a fresh initialisation. Continued training is how the shipped base
    # gets experts that specialise: an existing base, its routers supervised toward domain experts.
    init_from: str = ""
    num_hidden_layers: int = Field(4, ge=1)
    hidden_size: int = Field(256, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int = Field(4, ge=1)
    num_experts: int = Field(8, ge=1)
    num_experts_per_tok: int = Field(2, ge=1)
    moe_intermediate_size: int = Field(320, ge=1)
    shared_expert_intermediate_size: int = Field(640, ge=0)
    max_position_embeddings: int = Field(512, ge=1)
    norm_topk_prob: bool = False
    router_aux_loss_coef: float = Field(0.01, ge=0)
    initializer_range: float = Field(0.02, ge=0)

    @model_validator(mode="after")
    def _shape_fits(self) -> ModelSettings:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("model.hidden_size must be a multiple of model.num_attention_heads")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError("model.num_experts_per_tok must be in 1..num_experts")
        return self


class TrainSettings(Section):
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(16, ge=1)
    seq_len: int = Field(256, ge=1)
    lr: float = Field(1e-3, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0)
    beta2: float = Field(0.95, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    precision: Literal[PRECISIONS] = "bf16"  # "bf16" (autocast) or "fp32"
    # where it trains, as a run's runtime.device: "auto" (the first CUDA GPU when torch sees one, else
    # the CPU), "cpu", "cuda" or "cuda:N"
    device: str = Field("auto", pattern=DEVICE_PATTERN)
    # How documents are grouped by WordNet domain (lexicographer file, e.g. noun.animal):
    # "none" packs all shuffled documents into one stream; "sequences" packs each domain's
    # documents into its own sequences (batches mix domains); "batches" also draws every batch
    # from one domain. The router's load-balancing loss is computed per batch, so with
    # "batches" it asks each domain (not the whole corpus) for an even use of the experts.
    domain_grouping: Literal[DOMAIN_GROUPINGS] = "none"
    router_z_loss_coef: float = Field(0.0, ge=0)  # ST-MoE router z-loss: mean squared logsumexp of router logits
    # Router supervision (DEMix-like, annealed): every domain is assigned one expert (the largest
    # domains first, each to the expert with the fewest rows so far), and a cross-entropy term
    # pulls each router, in every layer, toward its row's domain expert. Its weight falls linearly
    # from router_supervision_coef to 0 at router_supervision_until x steps; the learned router
    # alone decides after that. Needs domain_grouping "sequences" or "batches" (rows of one domain).
    router_supervision_coef: float = Field(0.0, ge=0)
    router_supervision_until: float = Field(0.5, gt=0, le=1)
    # transformers' fused-experts kernel while training: "" = its default (grouped_mm), or "eager"
    # (a loop over experts: slower, the fallback if grouped_mm fails on a machine); not saved with the model
    experts_implementation: Literal[EXPERTS_IMPLEMENTATIONS] = ""
    log_every: int = Field(10, ge=0)
    eval_every: int = Field(250, ge=0)
    eval_docs: int = Field(300, ge=0)
    checkpoint_every: int = Field(100, ge=0)
    threads: int = Field(1, ge=0)  # torch CPU threads; 0 = torch's default. One thread degrades least on a shared CPU


class EvalSettings(Section):
    heldout_max_length: int = Field(256, ge=0)
    batch_size: int = Field(32, ge=0)
    generation_prompts: tuple[str, ...] = ("dog (noun, animal):", "violin (noun, artifact):",
                                           "run (verb, motion):", "happy (adjective):")
    max_new_tokens: int = Field(32, ge=0)
    graft_docs: int = Field(64, ge=0)  # held-out documents per domain that calibrate the grafting measurement
    # targets the card reports as met or missed (0 = no target)
    target_perplexity: float = Field(0.0, ge=0)  # held-out perplexity at most this
    target_probe_accuracy: float = Field(0.40, ge=0)  # probe accuracy (bytes-normalised) at least this
    target_domain_tv: float = Field(0.0, ge=0)  # mean pairwise TV distance of domains' expert loads, in most layers


class PretrainConfig(Section):
    seed: int = Field(0, ge=0)
    data: DataSettings = DataSettings()
    tokenizer: TokenizerSettings = TokenizerSettings()
    model: ModelSettings = ModelSettings()
    train: TrainSettings = TrainSettings()
    eval: EvalSettings = EvalSettings()

    @model_validator(mode="after")
    def _supervision_has_domains(self) -> PretrainConfig:
        if self.train.router_supervision_coef and self.train.domain_grouping == "none":
            raise ValueError("train.router_supervision_coef needs domain_grouping 'sequences' or 'batches' "
                             "(supervision targets come from the domain of each packed row)")
        return self


def load_config(path: str | Path | None, overrides: list[str] = ()) -> PretrainConfig:
    """Read a pretrain TOML file (None = all defaults) and apply `section.key=value` overrides."""
    return load(PretrainConfig, path, overrides)


def config_to_toml(config: PretrainConfig) -> str:
    """The resolved config as TOML (stored next to the model so it can be re-run)."""
    return to_toml(config)


def same_config(path: Path, config: PretrainConfig) -> bool:
    """Whether the config stored at `path` (by this or an earlier version's writer) is `config`."""
    try:
        return path.is_file() and load_config(path) == config
    except FlexmoeError:  # unreadable, or a key this version no longer has
        return False

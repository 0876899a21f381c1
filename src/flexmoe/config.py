"""The run configuration: one validated model, read from TOML files and `--set` overrides.

Every key has a default, so an empty config is the shipped demo (FLEx on the tiny base and
the builtin dataset). Unknown keys and bad values raise a one-line `FlexmoeError` that names
the key and the closest valid keys or the allowed values (the machinery: `flexmoe.settings`).

The sections every run reads are here; each method's own section lives beside its method
(`flexmoe/methods/<method>/config.py`, which also declares the method and what the checks
below read of it: `flexmoe.methods.registry`). Torch-free: importing it loads no model code.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from flexmoe.methods.fcmoe.config import FcmoeConfig
from flexmoe.methods.fedper.config import FedPerConfig
from flexmoe.methods.fedprox.config import FedProxConfig
from flexmoe.methods.flex.config import FlexConfig
from flexmoe.methods.registry import registered
from flexmoe.methods.rules_config import ServerConfig
from flexmoe.methods.scaffold.config import ScaffoldConfig
from flexmoe.settings import DEVICE_PATTERN, Section, load, parse_override, set_dotted, to_toml
from flexmoe.settings import valid_keys as section_keys

__all__ = ["DataConfig", "EvalConfig", "FaultsConfig", "FcmoeConfig", "FedPerConfig", "FedProxConfig", "FlexConfig",
           "LoraConfig", "PrivacyConfig", "RunConfig", "RuntimeConfig", "ScaffoldConfig", "SecAggConfig",
           "ServerConfig", "TrainConfig", "ValidationConfig", "WireConfig", "load_config", "parse_override",
           "save_config", "set_dotted", "valid_keys"]


class DataConfig(Section):
    source: str = "builtin"  # "builtin" or a path to a dolly/alpaca/jsonl/json/parquet/HF dataset
    format: Literal["auto", "dolly", "alpaca", "jsonl", "json", "parquet", "hf"] = "auto"
    # example field -> the file's key, e.g. {response = "answer"} (--set data.fields.response=answer)
    fields: dict[str, str] = {}
    skip_invalid: bool = False  # leave out invalid rows (their count is logged) instead of refusing the file
    partition: Literal["pathological", "iid", "dirichlet", "quantity"] = "pathological"
    by: Literal["domain", "category"] = "domain"
    per_client: int = Field(1, ge=1)  # groups (domains/categories) per client, pathological only
    # pathological with more groups than num_clients * per_client: give each group left over to the
    # smallest client ("assign"), or leave those groups out ("drop"; the run logs "N of M rows")
    leftover_groups: Literal["assign", "drop"] = "assign"
    alpha: float = Field(0.5, gt=0)  # Dirichlet concentration
    test_fraction: float = Field(0.1, gt=0, lt=1)
    max_train_per_client: int = Field(0, ge=0)  # 0 = all of the client's training examples
    persona: bool = False  # each client answers in its own convention (data/persona.py): clients that conflict
    template: Literal["alpaca", "chat"] = "alpaca"

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, fields: dict[str, str]) -> dict[str, str]:
        from flexmoe.data.formats import EXAMPLE_FIELDS  # flexmoe.data loads torch: read only when data.fields is set

        for name, key in fields.items():
            if name not in EXAMPLE_FIELDS:
                raise ValueError(f"unknown example field {name!r}; valid: {', '.join(EXAMPLE_FIELDS)}")
            if not key:
                raise ValueError(f"field {name!r} must name a key of the file")
        return fields


class TrainConfig(Section):
    """Local training. The default budget (5 rounds of 30 steps at lr 4e-3, cosine over rounds,
    bf16 autocast) was chosen on a development seed (100), never on a seed whose results are
    reported: docs/guide.md, "The default budget"."""

    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(4e-3, gt=0, le=1)
    # learning rate of the personal parameters (FLEx's graft and gate, FedPer's expert LoRA, FedAvg-FT's
    # fine-tuning), on the same schedule as lr; 0 = lr (one learning rate for everything). Not set: the
    # method's own, 4e-5 for flex and flex+fcmoe (chosen on seed 100), 0 for the others
    personal_lr: float = Field(0.0, ge=0, le=1)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine schedule floor, as a fraction of lr
    schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    local_steps: int = Field(30, ge=1)
    local_epochs: float = Field(0.0, ge=0)  # > 0 replaces local_steps by epochs over the client's data
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(256, ge=8)
    max_grad_norm: float = Field(1.0, ge=0)  # 0 = no clipping
    precision: Literal["fp32", "bf16"] = "bf16"  # bf16 = autocast over fp32 weights (fp32 = plain fp32)
    # recompute each decoder layer's activations in the backward pass: less memory, one more forward per step
    gradient_checkpointing: bool = False
    # AdamW moments across rounds: "keep" all (also those of the shared weights, although the aggregate
    # replaces the weights each round), "reset-shared" (the common practice: fresh moments for the
    # shared weights, the personal ones kept), or "reset" all
    optimizer_state: Literal["keep", "reset-shared", "reset"] = "keep"


class LoraConfig(Section):
    scope: Literal["attention", "attention+experts", "full"] = "attention"  # baselines only
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    # the attention projections the LoRA goes on, e.g. ["q_proj", "k_proj", "v_proj"] (the FLEx authors');
    # empty = every attention projection of the family
    attention: tuple[str, ...] = ()


class EvalConfig(Section):
    """Each client is evaluated on a stratified sample of its test split (balanced over categories,
    the same examples for every method of a seed: eval/detail.py); per-example scores are kept
    under `evals/` in the run directory. The last round uses the full sizes, earlier evaluated
    rounds (the learning curve) the `curve_*` sizes."""

    every: int = Field(2, ge=0)  # also evaluate (curve sizes) every N rounds: the learning curve; 0 = only after the last round
    base: bool = True  # also evaluate the untouched base at round 0, as the reference
    clients: int = Field(0, ge=0)  # clients evaluated: 0 = every client; N = a seeded sample of N, the same every round (large populations)
    max_test_examples: int = Field(128, ge=1)  # per client, last round (fewer when the test split is smaller)
    curve_test_examples: int = Field(16, ge=1)  # per client, earlier evaluated rounds
    max_new_tokens: int = Field(32, ge=1)
    batch_size: int = Field(32, ge=1)  # prompts per prefill chunk of greedy generation (the sample then decodes as one batch) and documents per loss batch
    knowledge: bool = True
    knowledge_max_docs: int = Field(512, ge=1)  # held-out documents, last round
    curve_docs: int = Field(64, ge=1)  # held-out documents, earlier evaluated rounds
    knowledge_max_length: int = Field(128, ge=8)
    routing: bool = True  # expert load, its std, entropy and drift from the base on the held-out corpus (needs knowledge)
    probes: bool = True  # multiple-choice knowledge probe accuracy (needs knowledge)
    max_probes: int = Field(0, ge=0)  # the first N builtin probes at the last round; 0 = all (each costs a forward pass of 4 options)
    curve_probes: int = Field(128, ge=1)  # probes at earlier evaluated rounds
    global_model: bool = True  # also evaluate the aggregated global model (shared weights, no graft)
    content_free: bool = True  # score the content-free answerer (right template, no facts) as a reference


class RuntimeConfig(Section):
    # torch intra-op threads; 0 = torch's default. One thread is the default: on a
    # shared CPU two busy-waiting threads competing with other processes ran up to 10x slower
    # than one, and the thread count changes float summation order, so results are bitwise
    # reproducible only at a fixed count (never chosen from the machine's load). On a machine
    # of your own, more threads can pay: benchmarks/results/fastpaths-*.md.
    threads: int = Field(1, ge=0)
    # processes the in-process engine runs clients on: 1 = every client in turn in this process;
    # N > 1 = N worker processes, each training and evaluating whole clients with `threads` torch
    # threads of its own, results identical to 1 (the same clients, gathered in client order).
    # Each worker holds its own copy of the model: N + 1 copies in memory with the main process's.
    # On a small model two single-threaded workers gain more than two threads in one process
    # (docs/guide.md). The Flower engine refuses N > 1: it runs each client in a SuperNode of its own.
    workers: int = Field(1, ge=1)
    # where the model runs: "auto" = the first CUDA GPU when there is one, else the CPU;
    # "cpu", "cuda" or "cuda:N" (a CUDA device asked for on a machine without one is an error)
    device: str = Field("auto", pattern=DEVICE_PATTERN)
    # dtype of the frozen base weights: "auto" = bf16 on a GPU, fp32 on the CPU (the CPU default:
    # it gives the measured results of benchmarks/results/). Trainable tensors (LoRA, graft, gate,
    # federated routers) keep fp32 master weights; a half-precision base trains under autocast.
    base_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # quantised frozen base through bitsandbytes (the optional `flexmoe[quant]` extra): "nf4"
    # quantises the fused experts to 4 bits (bitsandbytes' parametrisation; CPU and CUDA; methods
    # that keep the experts frozen), and on CUDA also nn.Linear (QLoRA's config); "int8" quantises
    # nn.Linear only, the fused experts stay at base_dtype (docs/gpu.md, "Quantised base").
    quantize: Literal["none", "nf4", "int8"] = "none"


class ValidationConfig(Section):
    """Checks of every client update at the server, before aggregation (engine/validation.py):
    keys, shapes and dtypes must be what the method expects and every value finite; an update
    failing a check is rejected and logged, and the round aggregates the rest."""

    max_update_norm: float = Field(0.0, ge=0)  # reject an update whose L2 norm (vs the global model) exceeds this; 0 = no bound


class PrivacyConfig(Section):
    """Central differential privacy for the shared part (engine/privacy.py): the server clips
    each client's update to L2 norm `clip_norm`, averages them uniformly and adds Gaussian noise
    of std noise_multiplier * clip_norm / (updates averaged), as Flower's
    DifferentialPrivacyServerSideFixedClipping; (epsilon, delta) from an RDP accountant."""

    noise_multiplier: float = Field(0.0, ge=0)  # z; 0 = off (no clipping, no noise)
    clip_norm: float = Field(1.0, gt=0)  # C
    delta: float = Field(1e-5, gt=0, lt=1)  # the delta epsilon is reported at


ATTACK = re.compile(r"^(sign-flip|same-value(:(?P<value>[^:]+))?|scale:(?P<scale>[^:]+)|noise:(?P<sigma>[^:]+))$")


class FaultsConfig(Section):
    """A research tool, off by default, in-process engine only: the listed clients attack by
    rewriting their update (their uplink relative to what they received) after honest local
    training (engine/faults.py): "sign-flip" (-update), "scale:<s>" (s * update), "noise:<sigma>"
    (update + Gaussian noise of std sigma, seeded), "same-value" (every value the update's RMS;
    "same-value:<c>": every value c)."""

    malicious_clients: list[int] = []  # ids of the attacking clients; empty = no attack (the default)
    attack: str = "sign-flip"  # sign-flip, scale:<s>, noise:<sigma>, same-value or same-value:<c>

    @field_validator("attack")
    @classmethod
    def _attack_known(cls, attack: str) -> str:
        match = ATTACK.match(attack)
        if match is None:
            raise ValueError("expected sign-flip, scale:<s>, noise:<sigma>, same-value or same-value:<c>")
        for name in ("value", "scale", "sigma"):
            text = match.group(name)
            if text is None:
                continue
            try:
                number = float(text)
            except ValueError:
                raise ValueError(f"{text!r} is not a number") from None
            if not math.isfinite(number) or (name == "sigma" and number <= 0):
                raise ValueError(f"{text!r} must be a finite number{' > 0' if name == 'sigma' else ''}")
        return attack

    @field_validator("malicious_clients")
    @classmethod
    def _distinct(cls, clients: list[int]) -> list[int]:
        if len(set(clients)) != len(clients) or any(c < 0 for c in clients):
            raise ValueError("client ids must be distinct and >= 0")
        return sorted(clients)


class WireConfig(Section):
    """How tensors travel between server and clients, both ways, in both engines (wire.py): fp32,
    or bf16 / fp16 halves, or int8 with one float32 scale per row (a tensor's first dimension).
    The uplink's shared weights travel as their difference from what the client received, so the
    rounding falls on the update; `error_feedback` keeps each client's rounding error and adds it to
    its next update. The server keeps its global model and checkpoints in fp32."""

    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # floating-point tensors travel in this type
    quantize: Literal["none", "int8"] = "none"  # int8: per-row symmetric int8 with a float32 scale per row
    error_feedback: bool = False  # clients add last round's uplink rounding error to their next update

    @model_validator(mode="after")
    def _consistent(self) -> WireConfig:
        if self.quantize == "int8" and self.dtype != "fp32":
            raise ValueError("wire.quantize = 'int8' sets the values' type itself (float32 scales); "
                             "leave wire.dtype = 'fp32'")
        if self.error_feedback and self.dtype == "fp32" and self.quantize == "none":
            raise ValueError("wire.error_feedback needs a lossy wire (wire.dtype bf16 or fp16, or wire.quantize int8)")
        return self

    @property
    def lossy(self) -> bool:
        return self.dtype != "fp32" or self.quantize != "none"


class SecAggConfig(Section):
    """Secure aggregation in Flower runs through Flower's SecAgg+ (engine/flower/secagg.py): each
    client masks its quantised update so that the server learns only the round's weighted mean,
    never one client's update; a client that drops out after sharing its keys is unmasked from
    the others' shares. The in-process engine refuses it (it would aggregate in the clear)."""

    enabled: bool = False  # run every training round of a Flower run through SecAgg+
    num_shares: float = Field(1.0, gt=0, le=1)  # each client's secrets are shared with this fraction of the round's clients
    reconstruction_threshold: float = Field(0.67, gt=0, le=1)  # fraction of the shares that rebuild a dropped client's mask
    clipping_range: float = Field(1.0, gt=0)  # each update value times weight / max_weight is clipped to +-this before quantisation (counted: secagg_clipped)
    quantization_range: int = Field(2**22, ge=2)  # integer levels over [-clipping_range, clipping_range]
    max_weight: float = Field(1000.0, gt=0)  # the largest example count a client may weigh (precision falls as it grows)


class RunConfig(Section):
    method: str = "flex"  # a name from the method registry (flexmoe.methods.registry)
    rounds: int = Field(5, ge=1)
    num_clients: int = Field(4, ge=1)
    clients_per_round: int = Field(0, ge=0)  # clients sampled (seeded) to train each round; 0 = every client
    seed: int = Field(0, ge=0)
    model: str = "tiny"
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    lora: LoraConfig = LoraConfig()
    flex: FlexConfig = FlexConfig()
    fcmoe: FcmoeConfig = FcmoeConfig()
    fedper: FedPerConfig = FedPerConfig()
    fedprox: FedProxConfig = FedProxConfig()
    scaffold: ScaffoldConfig = ScaffoldConfig()
    server: ServerConfig = ServerConfig()
    eval: EvalConfig = EvalConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    validation: ValidationConfig = ValidationConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    faults: FaultsConfig = FaultsConfig()
    wire: WireConfig = WireConfig()
    secagg: SecAggConfig = SecAggConfig()

    @model_validator(mode="before")
    @classmethod
    def _every_client_by_default(cls, data: Any) -> Any:
        """clients_per_round 0 (the default) resolves to num_clients, so `--set num_clients=2` alone works."""
        if isinstance(data, dict) and data.get("clients_per_round", 0) == 0:
            data = {**data, "clients_per_round": data.get("num_clients", cls.model_fields["num_clients"].default)}
        return data

    @model_validator(mode="before")
    @classmethod
    def _method_personal_lr(cls, data: Any) -> Any:
        """train.personal_lr not set: the method's own default (registry.declare_method's personal_lr)."""
        if not isinstance(data, dict):
            return data
        method, train = data.get("method", cls.model_fields["method"].default), data.get("train", {})
        info = registered().get(method) if isinstance(method, str) else None
        if info is None or not info.personal_lr or not isinstance(train, dict) or "personal_lr" in train:
            return data  # an unknown method or a malformed section: the field validators say so
        return {**data, "train": {**train, "personal_lr": info.personal_lr}}

    @model_validator(mode="after")
    def _clients_fit(self) -> RunConfig:
        if self.clients_per_round > self.num_clients:
            raise ValueError(
                f"clients_per_round = {self.clients_per_round} must be at most num_clients = {self.num_clients}"
            )
        return self

    @field_validator("method")
    @classmethod
    def _method_known(cls, method: str) -> str:
        methods = list(registered())
        if method not in methods:
            close = difflib.get_close_matches(method, methods, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"Input should be {', '.join(repr(m) for m in methods)}{hint}")
        return method

    @model_validator(mode="after")
    def _method_fits_privacy(self) -> RunConfig:
        methods = registered()
        private = [name for name, info in methods.items() if info.private]
        if self.privacy.noise_multiplier > 0 and self.method not in private:
            # only a reply that is the shared weights can be clipped and its mean noised
            raise ValueError(f"privacy.noise_multiplier > 0 needs a method whose reply is the shared weights "
                             f"({', '.join(private)}); method = {self.method!r}")
        return self

    @model_validator(mode="after")
    def _robust_fits(self) -> RunConfig:
        server, n = self.server, self.clients_per_round
        if server.robust == "none":
            return self
        name = f"server.robust = {server.robust!r}"
        averaging = [m for m, info in registered().items() if info.averages]
        if self.method not in averaging:
            raise ValueError(f"{name} replaces the mean of a rule that averages the replies "
                             f"({', '.join(averaging)}); method = {self.method!r}")
        if self.privacy.noise_multiplier > 0:
            raise ValueError(f"{name} needs each client's update, but privacy.noise_multiplier > 0 releases only "
                             "their noised mean: use one or the other")
        if server.robust == "trimmed-mean" and int(server.trim_beta * n) == 0:
            raise ValueError(f"server.trim_beta = {server.trim_beta:g} trims no reply of clients_per_round = {n} "
                             f"(int(trim_beta * n) = 0): raise it to at least {1 / n:g}")
        if server.robust == "krum" and not (server.krum_f < n and server.krum_keep <= n):
            raise ValueError(f"multi-Krum needs krum_f < clients_per_round and krum_keep <= clients_per_round = {n} "
                             f"(krum_f = {server.krum_f}, krum_keep = {server.krum_keep})")
        return self

    @model_validator(mode="after")
    def _secagg_fits(self) -> RunConfig:
        """SecAgg+ hides every client's update: whatever needs one of them cannot run with it."""
        if not self.secagg.enabled:
            return self
        private = [name for name, info in registered().items() if info.private]
        hidden = "secagg.enabled hides each client's update from the server"
        if self.method not in private:
            raise ValueError(f"{hidden}; it sums shared weights, which method = {self.method!r} does not send "
                             f"(allowed: {', '.join(private)})")
        for needs, active in (("server.robust", self.server.robust != "none"),
                              ("privacy.noise_multiplier (server-side DP clips each update)", self.privacy.noise_multiplier > 0),
                              ("validation.max_update_norm", self.validation.max_update_norm > 0)):
            if active:
                raise ValueError(f"{needs} needs each client's update, but {hidden}: use one or the other")
        if self.wire.lossy:
            raise ValueError("secagg.enabled quantises and masks the uplink itself: leave wire.dtype = 'fp32' and "
                             "wire.quantize = 'none'")
        if self.clients_per_round < 2:
            raise ValueError(f"secagg.enabled needs at least 2 clients per round (clients_per_round = {self.clients_per_round})")
        return self

    @model_validator(mode="after")
    def _attackers_exist(self) -> RunConfig:
        outside = [c for c in self.faults.malicious_clients if c >= self.num_clients]
        if outside:
            raise ValueError(f"faults.malicious_clients names client {outside[0]}, outside 0..{self.num_clients - 1}")
        return self


def valid_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key the config accepts, sections included."""
    return section_keys(model, prefix)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a TOML file (optional), apply `key=value` overrides, validate."""
    return load(RunConfig, path, overrides)


def save_config(config: RunConfig, path: Path) -> None:
    """Write the resolved config as TOML, atomically; `load_config` reads it back identically."""
    from flexmoe.files import write_text_atomic  # imports torch: not at module top, `--help` stays fast

    write_text_atomic(path, to_toml(config))

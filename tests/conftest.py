"""Shared fixtures: tiny random models of every supported MoE family (2 MoE layers, hidden 32,
4-8 experts), built from configs in memory; nothing is downloaded. Also the engine tests' small
world (a word-level tokenizer over synthetic examples, the session's saved tiny model and its run
config), the usage tests' Dolly file and FLEx run, the Flower tests' run config and the
pretraining tests' corpus. Fixtures that build models are session-scoped."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest
import torch

# Tiny tensors gain nothing from intra-op threads, and on a busy machine idle OpenMP workers
# spinning for a core made a tiny forward pass ~400x slower (3.5 s vs 8 ms, measured).
torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """Under pytest-xdist's loadgroup scheduling, the tests of one Flower module run on one worker:
    they share module-scoped deployments, which would otherwise be started once per worker."""
    for item in items:
        if item.get_closest_marker("flower") is not None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))

VOCAB = 96
_COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    # larger than the usual 0.02 so that experts differ clearly and selections are not near-ties
    initializer_range=0.2, tie_word_embeddings=False,
)
_DEEPSEEK = dict(
    num_key_value_heads=4,  # deepseek's attention needs as many kv heads as heads
    intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
    first_k_dense_replace=1, num_hidden_layers=3,  # one dense layer first, then two MoE layers
    kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
)

TINY_CONFIGS: dict[str, dict] = {
    "qwen2_moe": dict(intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                      num_experts=8, num_experts_per_tok=2),
    "qwen3_moe": dict(intermediate_size=48, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                      head_dim=8, norm_topk_prob=True),
    "mixtral": dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.1),
    "olmoe": dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2),
    "deepseek_v2": dict(_DEEPSEEK, q_lora_rank=None, n_group=1, topk_group=1, routed_scaling_factor=1.5),
    "deepseek_v3": dict(_DEEPSEEK, q_lora_rank=16, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                        norm_topk_prob=True),
    "granitemoe": dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2),
    "phimoe": dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, input_jitter_noise=0.1,
                   router_jitter_noise=0.1),
}
FAMILY_NAMES = sorted(TINY_CONFIGS)
JITTERING = ("mixtral", "phimoe")


def tiny_config(family: str, **overrides):
    from transformers import AutoConfig

    return AutoConfig.for_model(family, **{**_COMMON, **TINY_CONFIGS[family], **overrides})


def tiny_model(family: str, seed: int = 0, experts_implementation: str | None = None, **overrides):
    """A randomly initialised tiny model of `family` in eval mode (same seed -> same weights)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **overrides)
    if experts_implementation is not None:
        config._experts_implementation = experts_implementation
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if family == "deepseek_v3":
        # a non-zero correction bias, so the router's choice differs from the top-k of its scores
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    return model.eval()


def save_tokenizer(directory) -> None:
    """A word-level tokenizer over the tiny vocabulary ("w4" ... "w95"), saved the Hugging Face way."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "[UNK]": 3} | {f"w{i}": i for i in range(4, VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>").save_pretrained(directory)


def token_batches(seed: int = 0, batches: int = 2, batch_size: int = 2, length: int = 12) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (batch_size, length), generator=generator) for _ in range(batches)]


@pytest.fixture(params=FAMILY_NAMES)
def family(request) -> str:
    return request.param


@pytest.fixture
def model(family):
    return tiny_model(family)


@pytest.fixture
def batches():
    return token_batches()


@pytest.fixture(scope="session")
def saved_tiny_model(tmp_path_factory) -> str:
    """The tiny qwen2_moe (seed 0) with the engine tests' word-level tokenizer, saved once for the
    whole session: the model folder the end-to-end tests run on. Read-only: a test that changes a
    model folder saves its own."""
    path = tmp_path_factory.mktemp("tiny-qwen2moe")
    vocab = build_tokenizer(path)
    tiny_model("qwen2_moe", vocab_size=vocab, max_position_embeddings=128).save_pretrained(path)
    return str(path)


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A saved tiny qwen2_moe with its tokenizer: a local Hugging Face model directory."""
    directory = tmp_path / "tiny-qwen2-moe"
    tiny_model("qwen2_moe").save_pretrained(directory)
    save_tokenizer(directory)
    return directory


# ---- the engine tests' small world ------------------------------------------------------------
DOMAINS = {
    "animals": ["cat", "dog", "horse", "bird", "fish", "cow"],
    "food": ["bread", "apple", "rice", "cheese", "soup", "bean"],
    "tools": ["hammer", "saw", "drill", "wrench", "nail", "rope"],
    "places": ["city", "river", "hill", "farm", "town", "lake"],
}
TEMPLATE_WORDS = (
    "Below is an instruction that describes a task . Write a response that appropriately completes the request "
    "### Instruction : Input Response describe name the word what is a an of , paired with input provides further context"
).split()


def synthetic_examples():
    from flexmoe.data import Example

    examples = []
    for domain, words in DOMAINS.items():
        for i in range(12):
            word, other = words[i % len(words)], words[(i + 1) % len(words)]
            examples.append(Example(instruction=f"describe the word {word}", response=f"a {word} is a {other} of {domain}",
                                    category="describe", domain=domain, id=f"{domain}-{i}"))
    return examples


def build_tokenizer(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = sorted({w for ws in DOMAINS.values() for w in ws} | set(DOMAINS) | set(TEMPLATE_WORDS))
    vocab = {token: i for i, token in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(path)
    return len(vocab)


@pytest.fixture(scope="session")
def model_dir(saved_tiny_model) -> str:
    return saved_tiny_model  # what save_model(path, seed=0) saves


@pytest.fixture
def builtin_is_synthetic(monkeypatch):
    """The engine reads `data.source = "builtin"`; here it gets the small synthetic set (a module
    asks for it with `pytestmark = pytest.mark.usefixtures("builtin_is_synthetic")`)."""
    import flexmoe.data

    monkeypatch.setattr(flexmoe.data, "builtin_examples", synthetic_examples)


def engine_config(model_dir: str, *overrides: str):
    """A 2-round, 4-client run of the tiny model on the synthetic set: the engine tests' config."""
    from flexmoe.config import load_config

    return load_config(None, [
        f'model="{model_dir}"', "rounds=2", "num_clients=4", "clients_per_round=2", "seed=3",
        "train.local_steps=2", "train.batch_size=4", "train.max_length=64", "train.lr=5e-3",
        "lora.r=2", "flex.calibration_examples=4", "eval.max_test_examples=2", "eval.max_new_tokens=4",
        "eval.knowledge=false", "data.test_fraction=0.2", *overrides,
    ])


def run(model_dir: str, out: Path, *overrides: str, stop_after: int | None = None) -> dict:
    from flexmoe.engine.simulation import Simulation

    return Simulation(engine_config(model_dir, *overrides), out).run(stop_after=stop_after)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_safetensors(a: Path, b: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        assert fa.metadata() == fb.metadata()
        assert sorted(fa.keys()) == sorted(fb.keys())
        for key in fa.keys():
            assert torch.equal(fa.get_tensor(key), fb.get_tensor(key)), key


# ---- the usage tests: a Dolly file and a FLEx run on it ----------------------------------------
CATEGORIES = DOMAINS  # the engine tests' word lists, used here as Dolly categories
PROMPT = "describe the word cat"


def write_dolly(path: Path) -> Path:
    with path.open("w") as handle:
        for category, words in CATEGORIES.items():
            for i in range(10):
                word, other = words[i % len(words)], words[(i + 1) % len(words)]
                record = {"instruction": f"describe the word {word}", "context": "",
                          "response": f"a {word} is a {other} of {category}", "category": category}
                handle.write(json.dumps(record) + "\n")
    return path


def save_model(path: Path, seed: int) -> str:
    vocab = build_tokenizer(path)
    tiny_model("qwen2_moe", seed=seed, vocab_size=vocab, max_position_embeddings=128).save_pretrained(path)
    return str(path)


def train(model_dir: str, data: Path, out: Path, *overrides: str) -> Path:
    from flexmoe.config import load_config
    from flexmoe.engine.simulation import Simulation

    config = load_config(None, [
        f'model="{model_dir}"', f'data.source="{data}"', "data.by=category", "rounds=2", "num_clients=4",
        "clients_per_round=4", "seed=5", "train.local_steps=3", "train.batch_size=4", "train.max_length=64",
        "train.lr=2e-2", "lora.r=2", "flex.calibration_examples=4", "flex.gate_init_bias=2.0",
        "eval.max_test_examples=2", "eval.max_new_tokens=6", "eval.knowledge_max_docs=3",
        "eval.knowledge_max_length=32", "eval.max_probes=8", "data.test_fraction=0.2", *overrides,
    ])
    Simulation(config, out).run()
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, request) -> Path:
    return tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_"))


@pytest.fixture(scope="module")
def data_file(workdir) -> Path:
    return write_dolly(workdir / "dolly.jsonl")


@pytest.fixture(scope="module")
def flex_run(workdir, model_dir, data_file) -> Path:
    return train(model_dir, data_file, workdir / "flex-run")


def command(name: str, argv: list[str]) -> int:
    """Parse `argv` with the command's own arguments and run it (what `flexmoe NAME argv` does)."""
    import importlib

    module = importlib.import_module(f"flexmoe.commands.{name}")
    parser = argparse.ArgumentParser(prog=f"flexmoe {name}")
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def logits(model, tokenizer, text: str = PROMPT) -> torch.Tensor:
    enc = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


# ---- the Flower tests' run --------------------------------------------------------------------
FLOWER_RUN_CONFIG = """\
model = "{model}"
rounds = 2
num_clients = 2
clients_per_round = 2
seed = 3
[data]
source = "{data}"
test_fraction = 0.2
[train]
local_steps = 2
batch_size = 4
max_length = 64
lr = 5e-3
[lora]
r = 2
[flex]
calibration_examples = 4
[eval]
max_test_examples = 2
max_new_tokens = 4
knowledge_max_docs = 2
knowledge_max_length = 32
probes = false
"""


@pytest.fixture(scope="module")
def run_config(tmp_path_factory, saved_tiny_model) -> Path:
    """The session's tiny random qwen2_moe, a data file and a FLEx run config in a temp dir."""
    root = tmp_path_factory.mktemp("flower")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(e.__dict__) + "\n" for e in synthetic_examples()))
    path = root / "run.toml"
    path.write_text(FLOWER_RUN_CONFIG.format(model=saved_tiny_model, data=data))
    return path


# ---- the pretraining tests' corpus ------------------------------------------------------------
CORPUS_WORDS = ["stone", "river", "light", "bird", "song", "tree", "cold", "bright", "small", "green"]
CORPUS_DOMAINS = ["animal", "plant", "artifact"]


def corpus_documents(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(CORPUS_WORDS)}{i} (noun, {rng.choice(CORPUS_DOMAINS)}): a {rng.choice(CORPUS_WORDS)} "
            f"{rng.choice(CORPUS_WORDS)} that is {rng.choice(CORPUS_WORDS)}. It is a kind of {rng.choice(CORPUS_WORDS)}."
            for i in range(count)]


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    (directory / "train.txt").write_text("\n".join(corpus_documents(300, 0)) + "\n", encoding="utf-8")
    (directory / "heldout.txt").write_text("\n".join(corpus_documents(40, 1)) + "\n", encoding="utf-8")
    return directory


def tiny_pretrain_overrides(corpus_files, steps: int = 6) -> list[str]:
    return [f"data.corpus={json.dumps(str(corpus_files / 'train.txt'))}",
            f"data.heldout={json.dumps(str(corpus_files / 'heldout.txt'))}", 'data.probes="none"',
            "tokenizer.vocab_size=320", "model.hidden_size=32", "model.num_hidden_layers=2",
            "model.num_attention_heads=2", "model.num_key_value_heads=2", "model.moe_intermediate_size=16",
            "model.shared_expert_intermediate_size=32", "model.max_position_embeddings=64",
            f"train.steps={steps}", "train.batch_size=4", "train.seq_len=32", "train.warmup_steps=2",
            "train.log_every=1", "train.eval_every=3", "train.eval_docs=10", "train.checkpoint_every=3",
            "train.lr=0.01", 'eval.generation_prompts=["stone1 (noun, animal):"]', "eval.max_new_tokens=5",
            "eval.batch_size=8"]


@pytest.fixture(scope="session")
def wide_model_dir(tmp_path_factory) -> str:
    """The engine tests' model at real-model-like widths (multiples of 128): bitsandbytes' CPU
    4-bit kernels work in blocks and refuse the 32-wide tiny model's layers."""
    path = tmp_path_factory.mktemp("wide-qwen2moe")
    vocab = build_tokenizer(path)
    tiny_model("qwen2_moe", vocab_size=vocab, max_position_embeddings=128, hidden_size=256,
               num_key_value_heads=4, moe_intermediate_size=128, intermediate_size=256,
               shared_expert_intermediate_size=256).save_pretrained(path)
    return str(path)

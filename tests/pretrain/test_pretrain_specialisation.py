"""Pretraining options that make experts specialise (domain grouping, z-loss), device choice,
the time limit, and the card's specialisation measurements and targets."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from flexmoe.errors import FlexmoeError
from flexmoe.pretrain.specialisation import check_targets, domain_separation, total_variation
from flexmoe.pretrain.config import EvalSettings, MIXED, TokenizerSettings, TrainSettings, load_config
from flexmoe.pretrain.packing import (
    assign_domain_experts,
    domain_batch_at,
    pack_by_domain,
    row_targets,
    train_tokenizer,
    training_batches,
)
from flexmoe.pretrain.step import router_supervision_loss, router_z_loss, supervision_weight, training_device
from flexmoe.pretrain.train import pretrain

from helpers.corpus import corpus_documents, tiny_pretrain_overrides
from helpers.paths import REPO_ROOT

_LABEL = re.compile(r"\(noun, (\w+)\):")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(corpus_documents(200, 0), TokenizerSettings(vocab_size=300))


def test_domain_packing_keeps_each_sequence_to_one_domain_and_loses_no_document(tokenizer):
    documents = corpus_documents(120, 5)
    rows, domains = pack_by_domain(documents, tokenizer, seq_len=24, seed=0)
    assert len(domains) == rows.shape[0] and set(domains) <= {"noun.animal", "noun.plant", "noun.artifact", MIXED}
    for row, domain in zip(rows, domains):
        if domain == MIXED:
            continue
        text = tokenizer.decode(row.tolist(), skip_special_tokens=True)
        labels = set(_LABEL.findall(text))
        assert labels <= {domain.split(".")[1]}  # only this domain's documents (a cut-off label may be missing)
    every_token = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 2 for d in documents)
    assert every_token - 24 < rows.numel() <= every_token  # only the last mixed tail (< one sequence) is dropped
    assert all(domains[i] <= domains[i + 1] or domains[i + 1] == MIXED for i in range(len(domains) - 1))


def test_domain_batches_are_one_domain_each_cover_an_epoch_and_are_pure(tokenizer):
    row_domains = ["a"] * 10 + ["b"] * 7 + ["c"] * 3  # batch 4: a -> 2 batches + 2 left, b -> 1 + 3, c -> 0 + 3
    plan = [domain_batch_at(row_domains, step, 4, seed=1) for step in range(4)]
    assert [domain_batch_at(row_domains, step, 4, seed=1) for step in range(4)] == plan
    pure = [batch for batch in plan if len({row_domains[i] for i in batch}) == 1]
    assert len(pure) == 3  # two of a, one of b; the 8 left-over rows form the 2 mixed batches
    flat = [i for batch in plan for i in batch]
    assert len(flat) == len(set(flat)) == 16 and all(len(batch) == 4 for batch in plan)
    next_epoch = [domain_batch_at(row_domains, step, 4, seed=1) for step in range(4, 8)]
    assert next_epoch != plan  # every epoch reshuffles
    assert [domain_batch_at(row_domains, step, 4, seed=2) for step in range(4)] != plan


def test_training_batches_follow_the_grouping_setting(tokenizer):
    documents = corpus_documents(200, 6)
    for grouping in ("none", "sequences", "batches"):
        settings = TrainSettings(batch_size=4, seq_len=24, domain_grouping=grouping)
        rows, row_domains, picks_for_step = training_batches(documents, tokenizer, settings, seed=0)
        batch = rows[picks_for_step(3)]
        assert batch.shape == (4, 24) and torch.equal(batch, rows[picks_for_step(3)])
        assert (row_domains is None) == (grouping == "none")
    _, by_domain = pack_by_domain(documents, tokenizer, 24, 0)
    rows, row_domains, picks_for_step = training_batches(
        documents, tokenizer, TrainSettings(batch_size=4, seq_len=24, domain_grouping="batches"), 0)
    assert row_domains == by_domain
    single = 0
    for step in range(10):
        groups = {by_domain[i] for i in picks_for_step(step).tolist()}
        single += len(groups) == 1 and MIXED not in groups
    assert single >= 8  # 200 documents in 3 domains: nearly every batch is one domain's


def test_router_z_loss_is_the_mean_squared_logsumexp():
    logits = (torch.tensor([[0.0, 0.0], [1.0, 2.0]]), torch.tensor([[3.0, -1.0]]))
    first = (math.log(2) ** 2 + math.log(math.e + math.e ** 2) ** 2) / 2
    second = math.log(math.e ** 3 + math.e ** -1) ** 2
    assert float(router_z_loss(logits)) == pytest.approx((first + second) / 2, rel=1e-6)


def test_domain_experts_put_the_largest_domains_on_distinct_experts_and_balance_rows():
    rows = ["a"] * 9 + ["b"] * 6 + ["c"] * 5 + ["d"] * 2 + ["e"] * 2 + [MIXED] * 4
    mapping = assign_domain_experts(rows, num_experts=3)
    # a -> 0 (9), b -> 1 (6), c -> 2 (5), d -> 2 (7), e -> 1 (8); mixed rows get no expert
    assert mapping == {"a": 0, "b": 1, "c": 2, "d": 2, "e": 1}
    assert row_targets(["b", MIXED, "d"], mapping).tolist() == [1, -1, 2]


def test_router_supervision_is_the_cross_entropy_toward_each_rows_expert_and_anneals():
    logits = (torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [5.0, -5.0]]),  # 2 rows x 2 tokens, 2 experts
              torch.tensor([[0.0, 0.0]] * 4))
    targets = torch.tensor([1, -1])  # row 0 -> expert 1, row 1 unsupervised
    first = (math.log(1 + math.e ** 2) - 0.0 + math.log(1 + math.e) - 1.0) / 2  # -log p(expert 1) per token
    assert float(router_supervision_loss(logits, targets, seq_len=2)) == pytest.approx((first + math.log(2)) / 2)
    settings = TrainSettings(steps=100, router_supervision_coef=2.0, router_supervision_until=0.5)
    assert [supervision_weight(s, settings) for s in (0, 25, 50, 80)] == [2.0, 1.0, 0.0, 0.0]


def test_router_supervision_pulls_routers_toward_the_domain_expert(corpus_files, tmp_path):  # noqa: F811
    from flexmoe.models import load_base
    from flexmoe.pretrain.config import DOMAIN_EXPERTS
    from flexmoe.pretrain.packing import read_documents

    overrides = tiny_pretrain_overrides(corpus_files, steps=40) + [
        'train.domain_grouping="sequences"', "train.router_supervision_coef=5.0", "train.router_supervision_until=1.0",
        "train.lr=0.01", "train.warmup_steps=1", 'train.device="cpu"']
    out = pretrain(load_config(None, overrides), tmp_path / "supervised", log=lambda line: None)
    mapping = json.loads((out / DOMAIN_EXPERTS).read_text())
    model, tok = load_base(out)
    hits = total = 0
    from flexmoe.pretrain.packing import document_domain
    for doc in read_documents(str(corpus_files / "train.txt"), "train")[:40]:
        expert = mapping.get(document_domain(doc))
        if expert is None:
            continue
        ids = tok(doc, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out_logits = model(input_ids=ids, output_router_logits=True).router_logits
        for layer in out_logits:
            hits += int((layer.argmax(-1) == expert).sum())
            total += layer.shape[0]
    assert total and hits / total > 0.5  # measured 0.62; an unsupervised router: about 1 / num_experts = 0.125


def test_device_and_grouping_settings_are_checked():
    with pytest.raises(FlexmoeError, match="device"):
        load_config(None, ['train.device="tpu"'])
    with pytest.raises(FlexmoeError, match="domain_grouping"):
        load_config(None, ['train.domain_grouping="lexname"'])
    with pytest.raises(FlexmoeError, match="router_supervision_coef needs domain_grouping"):
        load_config(None, ["train.router_supervision_coef=1.0"])
    with pytest.raises(FlexmoeError, match="router_supervision_until"):
        load_config(None, ["train.router_supervision_until=0"])
    with pytest.raises(FlexmoeError, match="experts_implementation"):
        load_config(None, ['train.experts_implementation="batched"'])
    assert training_device("cpu").type == "cpu"
    assert training_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(FlexmoeError, match="train.device = 'cuda': no CUDA device"):
            training_device("cuda")


def test_time_limit_leaves_a_checkpoint_and_resume_ends_with_the_same_weights(corpus_files, tmp_path):  # noqa: F811
    overrides = tiny_pretrain_overrides(corpus_files, steps=4) + ['train.domain_grouping="batches"',
                                                            "train.router_z_loss_coef=0.001", 'train.device="cpu"',
                                                            'train.experts_implementation="eager"']
    config = load_config(None, overrides)
    straight = pretrain(config, tmp_path / "straight", log=lambda line: None)
    paused = pretrain(config, tmp_path / "paused", log=lambda line: None, time_limit_s=0)
    assert (paused / "checkpoint.pt").is_file() and not (paused / "model.safetensors").exists()
    pretrain(config, paused, resume=True, log=lambda line: None)
    weights, resumed = load_file(straight / "model.safetensors"), load_file(paused / "model.safetensors")
    assert all(torch.equal(weights[key], resumed[key]) for key in weights)
    log = (straight / "train_log.jsonl").read_text()
    assert '"z_loss"' in log and '"domain_grouping": "batches"' in (straight / "training_summary.json").read_text()


def _routing(loads: dict[str, list[list[float]]]) -> dict:
    layers = len(next(iter(loads.values())))
    routing = {"all": {"layers": {f"l{i}": {"load": [0.25] * 4} for i in range(layers)}}}
    for domain, per_layer in loads.items():
        routing[domain] = {"layers": {f"l{i}": {"load": load} for i, load in enumerate(per_layer)}}
    return routing


def test_domain_separation_is_the_mean_pairwise_total_variation():
    routing = _routing({"a": [[0.5, 0.5, 0, 0], [0.25] * 4],
                        "b": [[0, 0, 0.5, 0.5], [0.25] * 4],
                        "c": [[0.5, 0, 0.5, 0], [0.4, 0.1, 0.25, 0.25]]})
    separation = domain_separation(routing)
    assert separation["domains"] == ["a", "b", "c"] and separation["pairs"] == 3
    assert separation["layers"]["l0"] == pytest.approx((1.0 + 0.5 + 0.5) / 3)
    assert separation["layers"]["l1"] == pytest.approx((0 + 0.15 + 0.15) / 3)
    assert total_variation([1, 0], [0, 1]) == 1.0


def test_targets_report_met_and_missed():
    evaluation = {"heldout": {"perplexity": 10.0, "perplexity_ratio": 0.02},
                  "probes": {"probes": 1500, "accuracy": {"bytes": 0.65}},
                  "specialisation": {"layers": {"l0": 0.4, "l1": 0.35, "l2": 0.1}},
                  "grafting": {"distinct": {"l0": 3, "l1": 1, "l2": 2}}}
    settings = EvalSettings(target_perplexity=11.1, target_probe_accuracy=0.7, target_domain_tv=0.3)
    met = {t["name"].split(" (")[0]: t["met"] for t in check_targets(evaluation, settings)}
    assert met == {"held-out perplexity / unigram perplexity": True, "held-out perplexity": True,
                   "probe accuracy": False,
                   "layers whose mean pairwise domain TV distance reaches the target": True,
                   "layers where grafting picks one expert for every domain's client": False}
    defaults = check_targets(evaluation, SimpleNamespace(target_perplexity=0.0, target_probe_accuracy=0.4,
                                                         target_domain_tv=0.0))
    assert len(defaults) == 3  # no perplexity or TV target when they are 0


@pytest.mark.slow
def test_gpu_script_trains_pauses_resumes_and_packs_the_model_on_the_cpu(corpus_files, tmp_path):  # noqa: F811
    """scripts/pretrain-gpu.sh end to end with a shrunken config and device auto (the CPU here)."""
    import os
    import subprocess
    import sys
    import tarfile

    root = REPO_ROOT
    config = tmp_path / "small.toml"
    config.write_text("\n".join(["[data]", f"corpus = {json.dumps(str(corpus_files / 'train.txt'))}",
                                 f"heldout = {json.dumps(str(corpus_files / 'heldout.txt'))}", 'probes = "none"',
                                 "[tokenizer]", "vocab_size = 320", "[model]", "hidden_size = 32",
                                 "num_hidden_layers = 2", "num_attention_heads = 2", "num_key_value_heads = 2",
                                 "num_experts = 16", "moe_intermediate_size = 16",
                                 "shared_expert_intermediate_size = 32", "max_position_embeddings = 64",
                                 "[train]", "steps = 4", "batch_size = 4", "seq_len = 32", "warmup_steps = 2",
                                 "log_every = 1", "eval_every = 2", "eval_docs = 10", "checkpoint_every = 2",
                                 'domain_grouping = "batches"', "router_z_loss_coef = 0.001",
                                 "[eval]", 'generation_prompts = ["stone1 (noun, animal):"]', "max_new_tokens = 4",
                                 "graft_docs = 8", "target_domain_tv = 0.3"]) + "\n")
    env = {**os.environ, "OUT": str(tmp_path / "out"), "RUN_DIR": str(tmp_path / "run"),
           "WHEELS": str(tmp_path / "no-wheels"), "PYTHON": sys.executable}
    command = ["bash", str(root / "scripts" / "pretrain-gpu.sh"), str(config)]
    paused = subprocess.run(command, cwd=root, env={**env, "MAX_MINUTES": "0.00001"}, capture_output=True, text=True)
    assert paused.returncode == 3, paused.stdout + paused.stderr
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    parts = sorted((tmp_path / "out").glob("model.tar.part-*"))
    assert parts and (tmp_path / "out" / "SHA256SUMS").is_file()
    (tmp_path / "model.tar").write_bytes(b"".join(part.read_bytes() for part in parts))
    with tarfile.open(tmp_path / "model.tar") as archive:
        archive.extractall(tmp_path / "model", filter="data")
    evaluation = json.loads((tmp_path / "model" / "evaluation.json").read_text())
    assert evaluation["specialisation"]["pairs"] >= 1 and evaluation["grafting"]["distinct"]
    card = (tmp_path / "model" / "README.md").read_text()
    assert "## Targets" in card and "## Grafting by domain" in card and str(config) in card
    from flexmoe.models import load_base
    model, _ = load_base(tmp_path / "model")
    assert model.config.num_experts == 16


def test_v2_config_meets_the_size_and_token_budget():
    """configs/pretrain-tiny-v2.toml: qwen2_moe, >= 16 routed experts, <= 60 MB in bfloat16, >= 50M tokens."""
    from flexmoe.pretrain.step import build_model

    config = load_config(REPO_ROOT / "configs" / "pretrain-tiny-v2.toml")
    vocab = SimpleNamespace(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    tokenizer = type("Vocab", (), {"__len__": lambda self: config.tokenizer.vocab_size, **vars(vocab)})()
    with torch.device("meta"):
        model = build_model(config.model, tokenizer, config.seed)
    parameters = sum(p.numel() for p in model.parameters())
    assert model.config.model_type == "qwen2_moe" and config.model.num_experts >= 16
    assert 2 * parameters <= 60e6  # bfloat16 storage
    assert config.train.steps * config.train.batch_size * config.train.seq_len >= 50e6
    assert config.train.device == "auto" and config.eval.target_probe_accuracy >= 0.7


def test_init_from_continues_from_a_model_directory_with_its_tokenizer(corpus_files, tmp_path):  # noqa: F811
    first = pretrain(load_config(None, tiny_pretrain_overrides(corpus_files, steps=2)), tmp_path / "first", log=lambda line: None)
    overrides = tiny_pretrain_overrides(corpus_files, steps=1) + [f"model.init_from={json.dumps(str(first))}",
                                                           "train.lr=0.0", "train.warmup_steps=1"]
    second = pretrain(load_config(None, overrides), tmp_path / "second", log=lambda line: None)
    # lr 0: one step changes nothing, so the continued model is the first one, tokenizer included
    weights, continued = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert weights.keys() == continued.keys() and all(torch.equal(weights[k], continued[k]) for k in weights)
    assert (first / "tokenizer.json").read_text() == (second / "tokenizer.json").read_text()
    wrong = overrides + ["model.num_experts=4"]
    with pytest.raises(FlexmoeError, match="num_experts = 8, the config says 4"):
        pretrain(load_config(None, wrong), tmp_path / "wrong", log=lambda line: None)
    with pytest.raises(FlexmoeError, match="no model directory"):
        pretrain(load_config(None, tiny_pretrain_overrides(corpus_files) + ['model.init_from="/nonexistent"']),
                 tmp_path / "none", log=lambda line: None)

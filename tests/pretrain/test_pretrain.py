"""`flexmoe pretrain` on a tiny synthetic corpus: tokenizer, packing, schedule, resume, card."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from flexmoe.commands import pretrain as pretrain_command
from flexmoe.errors import FlexmoeError
from flexmoe.pretrain.card import document_domain, evaluate_and_write_card, unigram_loss
from flexmoe.pretrain.config import EOS, TokenizerSettings, TrainSettings, load_config
from flexmoe.pretrain.packing import batch_picks, pack_documents, train_tokenizer
from flexmoe.pretrain.step import lr_factor
from flexmoe.pretrain.train import pretrain

from helpers.corpus import corpus_documents, tiny_pretrain_overrides
from helpers.paths import REPO_ROOT



def test_tokenizer_round_trips_through_auto_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    documents = corpus_documents(200, 0)
    tokenizer = train_tokenizer(documents, TokenizerSettings(vocab_size=300))
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    assert len(loaded) == 300 and loaded.eos_token == EOS
    text = "river7 (noun, plant): ünïcode — is byte-level"
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert loaded.decode(ids) == text and 1 not in ids and 2 not in ids
    assert loaded(text)["input_ids"] == [1] + ids  # encoding prepends bos, as pretraining documents start
    again = train_tokenizer(documents, TokenizerSettings(vocab_size=300))
    assert again.get_vocab() == tokenizer.get_vocab()  # same corpus -> same tokenizer


def test_packing_keeps_every_document_whole_and_in_order():
    documents = corpus_documents(50, 3)
    tokenizer = train_tokenizer(documents, TokenizerSettings(vocab_size=300))
    rows = pack_documents(documents, tokenizer, seq_len=16, seed=0)
    stream = rows.reshape(-1).tolist()
    order = torch.randperm(50, generator=torch.Generator().manual_seed(0)).tolist()
    expected = []
    for index in order:
        expected += [1] + tokenizer(documents[index], add_special_tokens=False)["input_ids"] + [2]
    assert rows.shape[1] == 16 and stream == expected[: len(stream)] and len(expected) - len(stream) < 16


def test_batches_are_a_pure_function_of_the_step_and_cover_each_epoch():
    rows = torch.arange(10).unsqueeze(1)
    first_epoch = torch.cat([rows[batch_picks(len(rows), step, 2, seed=4)] for step in range(5)]).reshape(-1)
    assert sorted(first_epoch.tolist()) == list(range(10))
    assert torch.equal(rows[batch_picks(len(rows), 7, 2, seed=4)], rows[batch_picks(len(rows), 7, 2, seed=4)])
    assert not torch.equal(first_epoch, torch.cat([rows[batch_picks(len(rows), s, 2, seed=5)] for s in range(5)]).reshape(-1))


def test_learning_rate_warms_up_then_decays_to_the_floor():
    settings = TrainSettings(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, settings) == pytest.approx(0.1) and lr_factor(9, settings) == pytest.approx(1.0)
    assert lr_factor(10, settings) == pytest.approx(1.0) and lr_factor(55, settings) == pytest.approx(0.55)
    assert lr_factor(100, settings) == pytest.approx(0.1)


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nstepz = 3\n")
    with pytest.raises(FlexmoeError, match="stepz"):
        load_config(bad)
    with pytest.raises(FlexmoeError, match="precision"):
        load_config(None, ['train.precision="fp8"'])
    with pytest.raises(FlexmoeError, match="lr"):
        load_config(None, ['train.lr="fast"'])
    with pytest.raises(FlexmoeError, match="KEY=VALUE"):
        load_config(None, ["train.steps"])
    with pytest.raises(FlexmoeError, match="does-not-exist"):
        load_config(tmp_path / "does-not-exist.toml")
    assert load_config(None, ["train.steps=7", "seed=3"]).train.steps == 7


def test_shipped_pretrain_configs_parse_and_stage_two_continues_stage_one():
    configs = REPO_ROOT / "configs"
    first, second = load_config(configs / "pretrain-tiny-v1.toml"), load_config(configs / "pretrain-tiny.toml")
    for config in (first, second):
        assert config.model.num_experts == 8 and config.model.num_experts_per_tok == 2
        assert config.data.corpus == "builtin" and config.train.precision == "bf16"
    assert not first.model.init_from and second.model.init_from == "runs/pretrain-tiny-v1"
    assert second.train.router_supervision_coef > 0 and second.train.domain_grouping == "sequences"
    shape = [name for name in type(first.model).model_fields if name != "init_from"]
    assert all(getattr(first.model, name) == getattr(second.model, name) for name in shape)


@pytest.mark.slow
def test_pretrain_smoke_resume_and_card(corpus_files, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = load_config(None, tiny_pretrain_overrides(corpus_files))
    straight = pretrain(config, tmp_path / "straight", log=lambda line: None)

    def crash_at_step_5(line: str) -> None:
        if "step=5 " in line:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        pretrain(config, tmp_path / "resumed", log=crash_at_step_5)
    assert (tmp_path / "resumed" / "checkpoint.pt").is_file()
    pretrain(config, tmp_path / "resumed", resume=True, log=lambda line: None)
    weights = load_file(straight / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert weights.keys() == resumed.keys()
    assert all(torch.equal(weights[key], resumed[key]) for key in weights)  # resume is exact
    assert not (straight / "checkpoint.pt").exists()

    model = AutoModelForCausalLM.from_pretrained(straight, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(straight, local_files_only=True)
    assert model.config.model_type == "qwen2_moe" and model.config.tie_word_embeddings
    assert next(iter(weights.values())).dtype == torch.bfloat16
    log = [json.loads(line) for line in (straight / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, 7)) and log[-1]["loss"] < log[0]["loss"]

    evaluation = evaluate_and_write_card(straight, config, log=lambda line: None)
    card = (straight / "README.md").read_text()
    assert f"{evaluation['heldout']['perplexity']:.1f}" in card and "qwen2_moe" in card
    assert evaluation["heldout"]["loss"] < evaluation["heldout"]["ln_vocab"]
    assert set(evaluation["routing"]) >= {"all", "noun.animal"}
    assert json.loads((straight / "evaluation.json").read_text())["heldout"]["loss"] == evaluation["heldout"]["loss"]
    assert len(tokenizer) == 320


def test_unigram_baseline_hand_computed(tmp_path):
    documents = ["stone river", "stone"]
    tokenizer = train_tokenizer(documents * 5, TokenizerSettings(vocab_size=300))
    train_ids = [tokenizer(d, add_special_tokens=False)["input_ids"] + [2] for d in documents]
    counts = {}
    for ids in train_ids:
        for token in ids:
            counts[token] = counts.get(token, 0) + 1
    total = sum(counts.values()) + len(tokenizer)
    heldout = tokenizer("stone", add_special_tokens=False)["input_ids"] + [2]
    expected = -sum(math.log((counts.get(t, 0) + 1) / total) for t in heldout) / len(heldout)
    assert unigram_loss(tokenizer, documents, ["stone"], max_length=64) == pytest.approx(expected)


def test_document_domain():
    assert document_domain("dog (noun, animal): a member") == "noun.animal"
    assert document_domain("happy (adjective): enjoying") == "adjective"
    assert document_domain("wag (verb, motion):") == "verb.motion"
    assert document_domain("no parentheses here") == "other"


def test_command_reports_bad_flags_as_flexmoe_errors(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    pretrain_command.add_arguments(parser)
    args = parser.parse_args(["--output", str(tmp_path), "--eval-only", "--no-eval"])
    with pytest.raises(FlexmoeError, match="exclude"):
        pretrain_command.run(args)
    args = parser.parse_args(["--output", str(tmp_path / "new"), "--resume", "--no-eval",
                              "--set", "data.corpus=/nonexistent/corpus.txt"])
    with pytest.raises(FlexmoeError):
        pretrain_command.run(args)


def test_resume_refuses_a_missing_checkpoint_or_a_changed_config(corpus_files, tmp_path):
    config = load_config(None, tiny_pretrain_overrides(corpus_files))
    with pytest.raises(FlexmoeError, match="no checkpoint"):
        pretrain(config, tmp_path, resume=True)
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    (tmp_path / "pretrain-config.toml").write_text("seed = 99\n")
    with pytest.raises(FlexmoeError, match="config differs"):
        pretrain(config, tmp_path, resume=True)

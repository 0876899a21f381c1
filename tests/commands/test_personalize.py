"""`flexmoe personalize`: a new organisation joins a finished run (tiny random qwen2_moe, 2 rounds)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from flexmoe.errors import FlexmoeError

from helpers.usage import CATEGORIES, command, logits, train


@pytest.fixture(scope="module")
def newcomer_file(workdir) -> Path:
    """The new organisation's own data: one category of the run's, in its own wording."""
    path = workdir / "newcomer.jsonl"
    words = next(iter(CATEGORIES.values()))
    with path.open("w") as handle:
        for i in range(12):
            word = words[i % len(words)]
            handle.write(json.dumps({"instruction": f"describe the word {word} ({i})", "context": "",
                                     "response": f"{word} {word} is ours number {i}", "category": "new"}) + "\n")
    return path


@pytest.fixture(scope="module")
def joined(flex_run, newcomer_file, workdir) -> dict:
    from flexmoe.data import load_examples
    from flexmoe.engine.join import personalize

    # ids given here: paired statistics pair examples by id (file rows carry none of their own yet)
    examples = [dataclasses.replace(e, id=f"new-{i}") for i, e in enumerate(load_examples(newcomer_file))]
    return personalize(flex_run, examples, str(newcomer_file), workdir / "joined")


def test_joined_client_trains_its_graft_only_and_keeps_the_global_shared_part(joined, flex_run, workdir):
    from flexmoe.engine.restore import open_run, restore
    from flexmoe.models import read_graft, shared_state

    assert joined["client"] == 4  # the first id past the run's four clients
    client_dir = workdir / "joined" / "4"
    stored, metadata = read_graft(client_dir / "personal.safetensors")
    assert json.loads(metadata["selection"])
    restored = restore(flex_run, 4, state_dir=workdir / "joined")
    shared = shared_state(restored.model, restored.checkpoint.method.roles)
    global_weights = open_run(flex_run).global_weights
    assert set(shared) == set(global_weights) and all(torch.equal(shared[k], global_weights[k]) for k in shared)
    # the graft trained: its gate bias moved from flex.gate_init_bias (2.0 in these runs)
    biases = [v for k, v in stored.items() if k.endswith("gate.bias")]
    assert biases and any(not torch.allclose(b, torch.full_like(b, 2.0)) for b in biases)
    assert [r["round"] for r in joined["train"]] == [1, 2] and all(r["steps"] == 3 for r in joined["train"])
    # its personalised model is not the global one
    glob = restore(flex_run, None)
    assert not torch.allclose(logits(restored.model, restored.tokenizer), logits(glob.model, glob.tokenizer))


def test_joined_statistics_are_the_paired_differences_of_its_own_files(joined, workdir):
    from flexmoe.eval.detail import read_round

    final = read_round(workdir / "joined" / "evals", 2)
    base = read_round(workdir / "joined" / "evals", 0)["base-client-4"]
    personal, glob = final["personal-client-4"], final["global-client-4"]
    assert personal["ids"] == base["ids"] == glob["ids"] and personal["ids"]
    stats = joined["statistics"]
    by_hand = sum(p - b for p, b in zip(personal["rouge_l"], base["rouge_l"])) / len(base["rouge_l"])
    assert stats["rouge_l_vs_base"]["diff"] == pytest.approx(by_hand)
    assert stats["rouge_l_vs_global"]["diff"] == pytest.approx(
        sum(p - g for p, g in zip(personal["rouge_l"], glob["rouge_l"])) / len(glob["rouge_l"]))
    assert stats["rouge_l_vs_base"]["examples"] == len(base["ids"])
    assert "doc_loss_vs_base" in stats and "probes_vs_base" in stats
    assert joined["personalized"]["rouge_l"] == pytest.approx(sum(personal["rouge_l"]) / len(personal["rouge_l"]))


def test_generate_eval_and_export_accept_the_joined_client(joined, flex_run, workdir, capsys):
    from flexmoe.commands.eval import evaluate_run
    from flexmoe.engine.export import load_personalized
    from flexmoe.engine.restore import restore

    state = str(workdir / "joined")
    assert command("generate", ["--run", str(flex_run), "--state-dir", state, "--client", "4",
                                "--prompt", "describe the word cat", "--max-new-tokens", "3"]) == 0
    result = evaluate_run(flex_run, [4], state_dir=state)
    assert result["clients"][0]["rouge_l"] == pytest.approx(joined["personalized"]["rouge_l"])
    out = workdir / "export-4"
    assert command("export", ["--run", str(flex_run), "--state-dir", state, "--client", "4", "--out", str(out)]) == 0
    exported, tokenizer = load_personalized(out)
    restored = restore(flex_run, 4, state_dir=state)
    torch.testing.assert_close(logits(exported, tokenizer), logits(restored.model, restored.tokenizer))


def test_a_second_newcomer_gets_the_next_id_and_the_command_prints_its_statistics(flex_run, newcomer_file, workdir,
                                                                                   capsys):
    out = workdir / "second"
    assert command("personalize", ["--run", str(flex_run), "--data", str(newcomer_file), "--out", str(out),
                                   "--set", "rounds=1", "--set", "train.local_steps=2"]) == 0
    printed = capsys.readouterr().out
    assert "client 4 joined flex" in printed and "personalised - base" in printed
    assert command("personalize", ["--run", str(flex_run), "--data", str(newcomer_file), "--out", str(out),
                                   "--set", "rounds=1", "--set", "train.local_steps=1", "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["client"] == 5 and second["train"] == [{"lr": second["train"][0]["lr"], "loss": second["train"][0]["loss"],
                                                          "round": 1, "steps": 1}]


def test_methods_without_a_personal_part_and_federation_settings_are_refused(workdir, model_dir, data_file,
                                                                            newcomer_file, flex_run):
    from flexmoe.cli import main

    fedavg = train(model_dir, data_file, workdir / "fedavg-run", "method=fedavg", "rounds=1", "eval.knowledge=false")
    with pytest.raises(FlexmoeError, match="has no personal part"):
        command("personalize", ["--run", str(fedavg), "--data", str(newcomer_file)])
    with pytest.raises(FlexmoeError, match="--set lora.r: a joining client cannot change"):
        command("personalize", ["--run", str(flex_run), "--data", str(newcomer_file), "--set", "lora.r=4"])
    assert main(["personalize", "--run", str(flex_run), "--data", str(workdir / "missing.jsonl")]) == 2
    assert not (flex_run / "joined").exists()  # nothing half-written by a refusal


def test_fedper_newcomer_trains_its_expert_lora_and_a_failed_join_leaves_nothing(workdir, model_dir, data_file,
                                                                              newcomer_file, monkeypatch):
    from flexmoe.data import load_examples
    from flexmoe.engine.client import ClientRunner
    from flexmoe.engine.join import personalize
    from flexmoe.engine.restore import restore
    from flexmoe.models.roles import split_parameters

    run = train(model_dir, data_file, workdir / "fedper-run", "method=fedper", "rounds=1", "eval.knowledge=false")
    examples = load_examples(newcomer_file)
    result = personalize(run, examples, str(newcomer_file), workdir / "fedper-joined")
    restored = restore(run, result["client"], state_dir=workdir / "fedper-joined")
    split = split_parameters(restored.model, restored.checkpoint.method.roles)
    initial = restore(run, None)  # the global model: the expert LoRA as built (B = 0)
    initial_split = split_parameters(initial.model, initial.checkpoint.method.roles)
    assert split.personal and any(not torch.equal(p, initial_split.personal[n]) for n, p in split.personal.items())
    assert all(torch.equal(p, restored.checkpoint.global_weights[n]) for n, p in split.shared.items())

    def broken(*args, **kwargs):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(ClientRunner, "evaluate", broken)
    with pytest.raises(RuntimeError, match="disk gone"):
        personalize(run, examples, str(newcomer_file), workdir / "fedper-joined")
    assert not (workdir / "fedper-joined" / str(result["client"] + 1)).exists()
    assert not list((workdir / "fedper-joined" / "evals").glob(f"round-*/*-client-{result['client'] + 1}*"))

"""`flexmoe graft` on a local tiny MoE directory and an instruction file."""

from __future__ import annotations

import argparse
import json

import pytest

from flexmoe.cli import main
from flexmoe.data import collate, load_examples, tokenize_examples
from flexmoe.models import load_base, select_experts


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "client.jsonl"
    rows = [{"instruction": f"w{4 + i} w{10 + i} w{20 + i}", "response": f"w{30 + i} w{40 + 2 * i}"} for i in range(12)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_json_report_matches_the_python_api(tiny_model_dir, data_file, capsys):
    code = main(["graft", "--model", str(tiny_model_dir), "--data", str(data_file), "--k", "2", "--batch-size", "4",
                 "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    model, tokenizer = load_base(tiny_model_dir)
    features = tokenize_examples(load_examples(data_file), tokenizer, max_length=256)
    batches = [collate(features[i : i + 4], tokenizer.pad_token_id) for i in range(0, 12, 4)]
    expected = select_experts(model, batches, k=2)
    assert report["examples"] == 12 and report["k"] == 2 and report["strategy"] == "reconstruction"
    assert {name: entry["experts"] for name, entry in report["layers"].items()} == dict(expected)
    for name, entry in report["layers"].items():
        assert entry["margin"] == pytest.approx(expected.margins[name]) and entry["margin"] >= 0
        assert entry["tokens"] == int(sum((b["labels"] != -100).sum() for b in batches))  # response tokens
        singles = sorted(expected.losses[name])  # 8 experts: the median is the mean of the middle two
        assert entry["median_loss"] == pytest.approx((singles[3] + singles[4]) / 2)
        assert entry["worst_loss"] == pytest.approx(singles[-1]) and entry["worst_loss"] >= entry["median_loss"]


def test_table_names_every_layer(tiny_model_dir, data_file, capsys):
    assert main(["graft", "--model", str(tiny_model_dir), "--data", str(data_file)]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.mlp" in out and "model.layers.1.mlp" in out and "margin" in out
    assert "median" in out and "worst" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["--data", "{tmp}/absent.jsonl"], "absent.jsonl"),
    (["--model", "{tmp}/no-model"], "no-model' does not exist"),
    (["--k", "8"], "k=8 grafted experts per layer"),
    (["--max-tokens", "0"], "--max-tokens must be at least 1"),
])
def test_user_mistakes_exit_2_with_one_line(tiny_model_dir, data_file, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    base = {"--model": str(tiny_model_dir), "--data": str(data_file)}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value
    code = main(["graft", *[x for pair in base.items() for x in pair]])
    err = capsys.readouterr().err
    assert code == 2
    errors = [line for line in err.strip().splitlines() if not line.startswith("[")]  # not a progress line
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err


def test_cli_choices_follow_the_library():
    from flexmoe.commands import graft as command
    from flexmoe.models import STRATEGIES
    from flexmoe.models.selection import DEFAULT_MAX_TOKENS

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    assert command.STRATEGIES == STRATEGIES
    assert parser.get_default("max_tokens") == DEFAULT_MAX_TOKENS

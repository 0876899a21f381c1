"""`flexmoe data stats | partition | build` through the CLI entry point."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from flexmoe import cli
from flexmoe.data import builtin_examples, load_examples


@pytest.fixture
def flexmoe(monkeypatch, capsys):
    """Runs `flexmoe ARGS...` in-process; returns (exit code, stdout, stderr)."""
    # Only the data command: the test must not depend on other commands' imports.
    monkeypatch.setattr(cli, "COMMANDS", {"data": cli.COMMANDS["data"]})

    def run(*argv):
        code = cli.main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err
    return run


@pytest.fixture
def dolly_file(tmp_path):
    rows = [{"instruction": f"question {i}", "context": "", "response": f"answer {i}",
             "category": ["open_qa", "brainstorming", "summarization"][i % 3]} for i in range(30)]
    path = tmp_path / "dolly.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_stats_json_describes_the_builtin_dataset(flexmoe):
    code, out, _ = flexmoe("data", "stats", "--json")
    summary = json.loads(out)
    examples = builtin_examples()
    assert code == 0
    assert summary["examples"] == len(examples)
    assert summary["categories"] == dict(Counter(e.category for e in examples))
    assert summary["domains"] == dict(Counter(e.domain for e in examples))


def test_stats_json_on_a_dolly_file(flexmoe, dolly_file):
    code, out, _ = flexmoe("data", "stats", "--data", str(dolly_file), "--format", "dolly", "--json")
    assert code == 0
    assert json.loads(out) == {"examples": 30, "categories": {"brainstorming": 10, "open_qa": 10,
                                                              "summarization": 10}, "domains": {"": 30}}


def test_partition_writes_client_files(flexmoe, dolly_file, tmp_path):
    out_dir = tmp_path / "parts"
    code, out, _ = flexmoe("data", "partition", "--data", str(dolly_file), "--num-clients", "3",
                           "--by", "category", "--out", str(out_dir), "--json")
    stats = json.loads(out)
    assert code == 0 and stats["num_clients"] == 3
    assert json.loads((out_dir / "partition.json").read_text()) == stats
    for client in stats["clients"]:
        train = load_examples(out_dir / f"client_{client['client_id']}" / "train.jsonl")
        assert len(train) == client["train"]
        assert len({e.category for e in train}) == 1  # pathological by category, one each


@pytest.mark.parametrize("argv, message", [
    (["data", "stats", "--data", "/no/such/file.jsonl"], "/no/such/file.jsonl"),
    (["data", "partition", "--num-clients", "2", "--labels", "noun.animal,noun.moon"],
     "unknown domain 'noun.moon'; valid: adj.all"),
    (["data", "partition", "--num-clients", "2", "--scheme", "zipf"], "unknown partition scheme 'zipf'"),
    (["data", "stats", "--data", "x.jsonl", "--field", "response"], "expected NAME=KEY"),
    (["data", "build", "--wordnet-dir", "/no/wordnet"], "/no/wordnet/data.noun"),
])
def test_bad_input_is_one_line_and_exit_2(flexmoe, argv, message):
    code, out, err = flexmoe(*argv)
    assert code == 2 and out == ""
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_malformed_file_reports_file_and_line(flexmoe, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"instruction": "a", "response": "b"}\n{"instruction": \n', encoding="utf-8")
    code, _, err = flexmoe("data", "stats", "--data", str(path))
    assert code == 2 and f"{path}:line 2: malformed JSON" in err


def test_empty_client_is_named(flexmoe, dolly_file):
    code, _, err = flexmoe("data", "partition", "--data", str(dolly_file), "--num-clients", "40",
                           "--scheme", "iid")
    assert code == 2 and "client 30 has no examples: fewer examples than the 40 clients" in err

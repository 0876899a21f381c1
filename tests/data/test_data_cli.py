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


def reproduction_file(tmp_path, categories=("open_qa", "brainstorming", "summarization", "classification"),
                      rows=300, uncategorised=3):
    """The issue's new-user file: categories, unicode, 4,000-character contexts, CRLF, a few rows
    without a category (the last `uncategorised`)."""
    records = []
    for i in range(rows):
        category = categories[i % len(categories)] if i < rows - uncategorised else ""
        records.append({"instruction": f"Résume le texte n°{i} — «{category}» ✓", "context": ("Ω ß 漢字 " * 500)[:4000],
                        "response": f"réponse {i}", "category": category})
    path = tmp_path / "new-user.jsonl"
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in records).encode("utf-8"))
    return path


def test_pathological_partition_of_a_users_file_keeps_and_counts_every_row(flexmoe, tmp_path):
    path = reproduction_file(tmp_path)
    code, out, _ = flexmoe("data", "partition", "--data", str(path), "--num-clients", "4",
                           "--scheme", "pathological", "--by", "category")
    assert code == 0
    lines = out.splitlines()
    assert lines[-1].startswith("4 clients: 300 of 300 rows (")
    held = [line for line in lines if line.strip().startswith("client")]
    assert len(held) == 4 and all(" of 300 rows " in line for line in held)
    assert "brainstorming" in out  # no category dropped in favour of the rows without one
    assert sum(int(line.split(":")[1].split(" of ")[0]) for line in held) == 300


def test_eight_dolly_categories_on_four_clients_keep_every_row(flexmoe, tmp_path):
    categories = ("open_qa", "general_qa", "classification", "closed_qa", "brainstorming",
                  "information_extraction", "summarization", "creative_writing")
    path = reproduction_file(tmp_path, categories, rows=160, uncategorised=0)
    code, out, _ = flexmoe("data", "partition", "--data", str(path), "--format", "dolly", "--num-clients", "4",
                           "--by", "category", "--json")
    stats = json.loads(out)
    assert code == 0 and stats["rows"] == stats["total_rows"] == 160
    assert sorted(name for client in stats["clients"] for name in client["categories"]) == sorted(categories)
    code, out, _ = flexmoe("data", "partition", "--data", str(path), "--format", "dolly", "--num-clients", "4",
                           "--by", "category", "--leftover-groups", "drop")
    assert code == 0 and out.splitlines()[-1].startswith("4 clients: 80 of 160 rows")  # said, not silent


def test_every_invalid_row_at_once_and_skip_invalid(flexmoe, tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "response": "" if i % 5 == 0 else "a"}) + "\n"
                            for i in range(100)))
    code, out, err = flexmoe("data", "stats", "--data", str(path))
    assert code == 2 and "20 invalid rows (fix them, or set data.skip_invalid = true" in err
    assert err.count(f"{path}:line ") == 20 and f"{path}:line 96: field 'response' (response) is empty" in err
    code, out, err = flexmoe("data", "stats", "--data", str(path), "--skip-invalid", "--json")
    assert code == 0 and json.loads(out)["examples"] == 80

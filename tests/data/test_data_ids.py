"""Example ids of data files (one per row, stable, unique) and the checks of a field mapping."""

from __future__ import annotations

import hashlib
import json

import pytest

from flexmoe import cli
from flexmoe.data import load_data, load_examples
from flexmoe.errors import FlexmoeError
from flexmoe.analysis.paired import cells


def write_jsonl(path, rows) -> str:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


def dolly_rows(count: int = 6) -> list[dict]:
    """Dolly's own keys (instruction, context, response, category): no id, as in databricks-dolly-15k."""
    return [{"instruction": f"question {i % 3}", "context": "", "response": "same answer",
             "category": ["open_qa", "brainstorming"][i % 2]} for i in range(count)]


def test_rows_without_an_id_get_their_own_stable_id(tmp_path):
    path = write_jsonl(tmp_path / "dolly.jsonl", dolly_rows())
    examples = load_examples(path, format="dolly")
    ids = [e.id for e in examples]
    assert len(set(ids)) == 6 and all(ids)  # rows 1 and 4 have the same text: their line tells them apart
    assert [i.split("-")[:2] for i in ids] == [["row", str(n)] for n in range(1, 7)]
    text = "\0".join(("question 0", "", "same answer"))
    assert ids[0] == f"row-1-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    assert ids == [e.id for e in load_examples(path, format="dolly")]  # the same on every read
    (tmp_path / "copy.jsonl").write_text((tmp_path / "dolly.jsonl").read_text())
    assert ids == [e.id for e in load_examples(tmp_path / "copy.jsonl", format="dolly")]
    given = [{**row, "id": f"q{i}"} for i, row in enumerate(dolly_rows())]  # a file's own ids are kept
    assert [e.id for e in load_examples(write_jsonl(tmp_path / "ids.jsonl", given))] == [f"q{i}" for i in range(6)]


def test_a_repeated_id_is_one_line_naming_both_rows(tmp_path):
    rows = [{**row, "id": str(i % 4)} for i, row in enumerate(dolly_rows())]
    path = write_jsonl(tmp_path / "dup.jsonl", rows)
    with pytest.raises(FlexmoeError) as error:
        load_examples(path, skip_invalid=True)
    assert str(error.value) == f"{path}:line 5: duplicate id '0' (also on line 1); ids must be unique " \
                               f"(without an id field every row gets its own)"


@pytest.mark.parametrize("name, key", [("context", "cxt"), ("category", "kidn"), ("response", "answr")])
def test_a_mapped_key_no_row_has_names_it_and_the_files_keys(tmp_path, name, key):
    rows = [{"instruction": f"q{i}", "ctx": "some context", "response": f"a{i}", "kind": "qa"} for i in range(3)]
    path = write_jsonl(tmp_path / "own.jsonl", rows)
    with pytest.raises(FlexmoeError) as error:
        load_examples(path, fields={name: key}, skip_invalid=True)
    assert str(error.value) == f"{path}: field mapping {name}={key}: no row has the key {key!r}; " \
                               "the file's keys: ctx, instruction, kind, response"
    assert [e.context for e in load_examples(path, fields={"context": "ctx", "category": "kind"})] == ["some context"] * 3


def test_a_mistyped_field_on_the_command_line_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", {"data": cli.COMMANDS["data"]})
    path = write_jsonl(tmp_path / "own.jsonl", [{"instruction": "q", "ctx": "c", "response": "a"}])
    assert cli.main(["data", "stats", "--data", path, "--field", "context=cxt"]) != 0
    err = capsys.readouterr().err.strip()
    assert "field mapping context=cxt" in err and "ctx, instruction, response" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_skipped_rows_are_returned_with_their_lines(tmp_path):
    rows = [*dolly_rows(3), "{broken", {"instruction": "q", "response": ""}, *dolly_rows(2)]
    examples, skipped = load_data(write_jsonl(tmp_path / "bad.jsonl", rows), skip_invalid=True)
    assert len(examples) == 5
    assert [s.split(": ")[0].rsplit(":", 1)[1] for s in skipped] == ["line 4", "line 5"]


def test_answers_pair_by_id_or_by_position_only_where_the_ids_are_aligned():
    by_id = cells([(0, {0: (["b", "a", "c"], [0.2, 0.1, 0.3])}, {0: (["a", "b", "d"], [0.5, 0.7, 0.9])})])
    assert by_id == {(0, 0): ([0.1, 0.2], [0.5, 0.7])}
    # a run directory of an older flexmoe: every id "" — the same sample on both sides pairs by position
    legacy = ["", "", ""]
    assert cells([(0, {1: (legacy, [0.1, 0.2, 0.3])}, {1: (legacy, [0.4, 0.5, 0.6])})]) == \
        {(0, 1): ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])}
    # repeated ids that differ between the sides: no way to tell which answers match
    assert cells([(0, {1: (["", "", "x"], [0.1, 0.2, 0.3])}, {1: (["x", "", ""], [0.4, 0.5, 0.6])})]) == {}

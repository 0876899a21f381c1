"""Loaders: Dolly / Alpaca / generic JSON(L) / parquet / HF directories, their errors, and fuzzing."""

from __future__ import annotations

import json
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexmoe.data import Example, load_examples
from flexmoe.data.formats import MAX_REPORTED
from flexmoe.errors import FlexmoeError

DOLLY_ROWS = [
    {"instruction": "When did Virgin Australia start operating?",
     "context": "Virgin Australia commenced services on 31 August 2000.",
     "response": "Virgin Australia commenced services on 31 August 2000.", "category": "closed_qa"},
    {"instruction": "Which is a species of fish? Tope or Rope", "context": "",
     "response": "Tope", "category": "classification"},
    {"instruction": "Why can camels survive for long without water?", "context": "",
     "response": "Camels use the fat in their humps to keep them filled with energy.", "category": "open_qa"},
]
ALPACA_ROWS = [
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "1. Eat a balanced diet. 2. Exercise regularly. 3. Get enough sleep."},
    {"instruction": "Translate the sentence into French.", "input": "The cat sleeps.",
     "output": "Le chat dort."},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def dolly_file(tmp_path):
    return write_jsonl(tmp_path / "dolly.jsonl", DOLLY_ROWS)


@pytest.fixture
def alpaca_file(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(ALPACA_ROWS, indent=2), encoding="utf-8")
    return path


def test_dolly_fields_map_to_example(dolly_file):
    examples = load_examples(dolly_file, "dolly")
    assert examples[0] == Example(instruction=DOLLY_ROWS[0]["instruction"], response=DOLLY_ROWS[0]["response"],
                                  context=DOLLY_ROWS[0]["context"], category="closed_qa",
                                  id=examples[0].id)
    assert examples[0].id.startswith("row-1-")  # Dolly has no id field: each row gets its own
    assert [e.category for e in examples] == ["closed_qa", "classification", "open_qa"]


def test_dolly_file_is_auto_detected_as_jsonl(dolly_file):
    assert load_examples(dolly_file) == load_examples(dolly_file, "dolly")


def test_alpaca_input_becomes_context(alpaca_file):
    examples = load_examples(alpaca_file, "alpaca")
    assert [(e.instruction, e.context, e.response) for e in examples] == [
        (row["instruction"], row["input"], row["output"]) for row in ALPACA_ROWS]
    assert load_examples(alpaca_file) == examples  # .json auto-detected, aliases find input/output


def test_generic_jsonl_with_field_mapping(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"q": "2+2?", "a": "4", "topic": "math", "id": 7}])
    examples = load_examples(path, "jsonl", {"instruction": "q", "response": "a", "domain": "topic"})
    assert examples == [Example(instruction="2+2?", response="4", domain="math", id="7")]


def test_parquet_round_trip(tmp_path):
    import pyarrow
    import pyarrow.parquet

    path = tmp_path / "dolly.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(DOLLY_ROWS), path)
    assert load_examples(path) == load_examples(write_jsonl(tmp_path / "d.jsonl", DOLLY_ROWS), "dolly")


def test_hf_save_to_disk_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ALPACA_ROWS)}).save_to_disk(str(tmp_path / "hf"))
    examples = load_examples(tmp_path / "hf")
    assert [(e.instruction, e.context, e.response) for e in examples] == [
        (row["instruction"], row["input"], row["output"]) for row in ALPACA_ROWS]


def test_hf_directory_without_datasets_installed_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    (tmp_path / "hf").mkdir()
    with pytest.raises(FlexmoeError, match=r"optional .datasets. package"):
        load_examples(tmp_path / "hf")


# ---------------------------------------------------------------- bad input


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(DOLLY_ROWS[0]) + "\n" + '{"instruction": "x", "response": \n', encoding="utf-8")
    with pytest.raises(FlexmoeError, match=r"bad\.jsonl:line 2: malformed JSON"):
        load_examples(path)


def test_malformed_json_array_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]', encoding="utf-8")
    with pytest.raises(FlexmoeError, match=r"bad\.json:line 3: malformed JSON"):
        load_examples(path, "alpaca")


def test_missing_field_names_field_and_line(tmp_path):
    rows = [ALPACA_ROWS[0], {"instruction": "no output here", "input": ""}]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    with pytest.raises(FlexmoeError, match=r"a\.json:line 7: missing field 'output' \(response\)"):
        load_examples(path, "alpaca")


def test_missing_field_in_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [DOLLY_ROWS[0], {"instruction": "x", "context": "", "category": "c"}])
    with pytest.raises(FlexmoeError, match=r"d\.jsonl:line 2: missing field 'response'"):
        load_examples(path, "dolly")


def test_wrong_type_is_named(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "x", "response": 3}])
    with pytest.raises(FlexmoeError, match=r"line 1: field 'response' must be a string, got int"):
        load_examples(path)


def test_unreadable_path_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "data.jsonl"
    with pytest.raises(FlexmoeError, match=str(missing)):
        load_examples(missing)


def test_unknown_format_and_unknown_mapping_key(dolly_file):
    with pytest.raises(FlexmoeError, match="valid: dolly, alpaca"):
        load_examples(dolly_file, "csv")
    with pytest.raises(FlexmoeError, match="unknown field mapping key 'answer'"):
        load_examples(dolly_file, "jsonl", {"answer": "response"})
    with pytest.raises(FlexmoeError, match="field mapping 'response' must name a key"):
        load_examples(dolly_file, "jsonl", {"response": ["output"]})


def test_lone_surrogate_escape_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"instruction": "\ud800", "response": "b"}])
    with pytest.raises(FlexmoeError, match="line 1: field 'instruction' contains an invalid Unicode escape"):
        load_examples(path)


def test_non_utf8_file_names_line(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(json.dumps(DOLLY_ROWS[0]).encode() + b'\n{"instruction": "caf\xe9"}\n')
    with pytest.raises(FlexmoeError, match=r"latin\.jsonl:line 2: not UTF-8"):
        load_examples(path)


def test_unicode_line_separators_inside_strings_are_valid_jsonl(tmp_path):
    rows = [{"instruction": f"a{sep}b", "response": f"c{sep}d", "context": "x\u2028y\u2029z\x85"}
            for sep in ("\u2028", "\u2029", "\x85")]
    path = tmp_path / "seps.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows), encoding="utf-8")  # CRLF too
    examples = load_examples(path)
    assert [(e.instruction, e.response, e.context) for e in examples] == \
        [(r["instruction"], r["response"], r["context"]) for r in rows]


def _rows_with_empty_responses(tmp_path, bad: int):
    rows = [{"instruction": f"q{i}", "response": "" if i % 2 else f"a{i}"} for i in range(2 * bad)]
    path = tmp_path / "empty.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]) + "{broken\n" + json.dumps(rows[-1]) + "\n")
    return path


def test_every_invalid_row_is_reported_at_once(tmp_path):
    path = _rows_with_empty_responses(tmp_path, bad=40)  # 40 empty responses (even lines) and one broken line
    with pytest.raises(FlexmoeError) as caught:
        load_examples(path)
    header, *listed = str(caught.value).split("\n")
    assert header.startswith("41 invalid rows")
    assert len(listed) == MAX_REPORTED + 1 and listed[-1].strip() == "... and 21 more"
    assert listed[0].strip() == f"{path}:line 2: field 'response' (response) is empty"
    assert listed[9].strip() == f"{path}:line 20: field 'response' (response) is empty"


def test_skip_invalid_keeps_the_valid_rows_and_says_how_many(tmp_path, caplog):
    path = _rows_with_empty_responses(tmp_path, bad=40)
    with caplog.at_level("WARNING", logger="flexmoe.data"):
        examples = load_examples(path, skip_invalid=True)
    assert [e.instruction for e in examples] == [f"q{i}" for i in range(0, 80, 2)]
    assert "skipped 41 invalid rows of 81" in caplog.text


# ---------------------------------------------------------------- fuzzing: only FlexmoeError, never another exception

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
records = st.dictionaries(
    st.sampled_from(["instruction", "response", "context", "input", "output", "category", "id", "x"]),
    json_values, max_size=6,
)


def _load_or_clear_error(path, format):
    try:
        examples = load_examples(path, format)
    except FlexmoeError as err:  # one line, or a count then one line per invalid row, each naming the file
        header, *rows = str(err).split("\n")
        assert not rows or (header.endswith("invalid rows (fix them, or set data.skip_invalid = true to train on the "
                                            "valid rows):") and all(str(path) in row for row in rows[:MAX_REPORTED]))
        return
    assert examples and all(isinstance(e.instruction, str) and e.instruction.strip() for e in examples)


@FUZZ
@given(data=st.binary(max_size=300), format=st.sampled_from(["dolly", "alpaca", "jsonl", "json"]))
def test_fuzz_random_bytes(tmp_path, data, format):
    path = tmp_path / "fuzz.data"
    path.write_bytes(data)
    _load_or_clear_error(path, format)


@FUZZ
@given(rows=st.lists(records | json_values, min_size=1, max_size=4), cut=st.integers(min_value=0, max_value=400),
       format=st.sampled_from(["dolly", "alpaca", "jsonl", "json"]))
def test_fuzz_truncated_and_mistyped_records(tmp_path, rows, cut, format):
    text = json.dumps(rows) if format in ("alpaca", "json") else "".join(json.dumps(r) + "\n" for r in rows)
    path = tmp_path / "fuzz.data"
    path.write_text(text[:cut] if cut < len(text) else text, encoding="utf-8")
    _load_or_clear_error(path, format)


@FUZZ
@given(rows=st.lists(records, min_size=1, max_size=4))
def test_fuzz_parquet_with_wrong_types(tmp_path, rows):
    import pyarrow
    import pyarrow.parquet

    # Parquet columns need one type each: keep the rows pyarrow can store at all.
    path = tmp_path / "fuzz.parquet"
    try:
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    except (pyarrow.ArrowException, TypeError, ValueError, OverflowError):
        return
    _load_or_clear_error(path, "parquet")

"""Loaders for instruction data files: Dolly, Alpaca, generic JSON/JSON lines, parquet, HF dirs.

Every loader yields `Example`s; every user mistake (unreadable path, malformed JSON, a
missing or mistyped field, a mapped key no row has, a repeated id) raises `FlexmoeError` naming
the file and line (or row). Invalid rows are all reported at once (the first `MAX_REPORTED`, and
their total), or skipped with `skip_invalid=True` (`load_data` says how many and which). A row
without an id gets one of its own (its place among the file's records and a hash of its text).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

from flexmoe.data.example import Example
from flexmoe.errors import FlexmoeError

FORMATS = ("dolly", "alpaca", "jsonl", "json", "parquet", "hf")
EXAMPLE_FIELDS = ("instruction", "response", "context", "category", "domain", "id")
REQUIRED_FIELDS = ("instruction", "response")
MAX_REPORTED = 20  # invalid rows listed in the error; the total is always given

log = logging.getLogger("flexmoe.data")

# Example field → the source key each format uses for it.
_FORMAT_FIELDS = {
    "dolly": {"instruction": "instruction", "context": "context", "response": "response", "category": "category"},
    "alpaca": {"instruction": "instruction", "context": "input", "response": "output"},
}
# Generic formats take the first of these keys a record has, unless a field mapping says otherwise.
_ALIASES = {
    "instruction": ("instruction", "prompt", "question"),
    "response": ("response", "output", "answer", "completion"),
    "context": ("context", "input"),
    "category": ("category", "task"),
    "domain": ("domain",),
    "id": ("id",),
}


def load_examples(path: str | Path, format: str | None = None,
                  fields: Mapping[str, str] | None = None, skip_invalid: bool = False) -> list[Example]:
    """Examples from `path`; `format` is guessed from the path when None.

    `fields` maps Example field names to the file's keys, e.g. {"response": "answer"}. Invalid
    rows raise one error listing them all, or with `skip_invalid` are left out (and counted in
    a log warning).
    """
    return load_data(path, format, fields, skip_invalid)[0]


def load_data(path: str | Path, format: str | None = None, fields: Mapping[str, str] | None = None,
              skip_invalid: bool = False) -> tuple[list[Example], list[str]]:
    """`load_examples`, and the message of each invalid row it skipped (`skip_invalid`)."""
    examples, invalid = read_examples(path, format, fields)
    if invalid and not skip_invalid:
        raise FlexmoeError(invalid_rows_message(invalid))
    if invalid:
        log.warning("%s: skipped %d invalid rows of %d (data.skip_invalid); the first: %s",
                    path, len(invalid), len(invalid) + len(examples), invalid[0])
    if not examples:
        raise FlexmoeError(f"{path}: no examples found" + (" (every row was invalid)" if invalid else ""))
    return examples, invalid


def read_examples(path: str | Path, format: str | None = None,
                  fields: Mapping[str, str] | None = None) -> tuple[list[Example], list[str]]:
    """(valid examples, one message per invalid row) from `path`.

    A file that cannot be read as a whole (missing, not UTF-8, a broken JSON array) still raises.
    """
    path = Path(path)
    format = format or detect_format(path)
    if format not in FORMATS:
        raise FlexmoeError(f"unknown data format {format!r}; valid: {', '.join(FORMATS)}")
    mapping = _field_mapping(format, fields)
    examples, invalid, places, keys = [], [], {}, set()
    for row, (where, record) in enumerate(_records(path, format), 1):
        if isinstance(record, dict):
            keys.update(record)
        try:
            if isinstance(record, _Invalid):
                raise FlexmoeError(f"{path}:{where}: {record.reason}")
            example = _with_id(_to_example(record, mapping, path, where), row)
        except FlexmoeError as err:
            invalid.append(str(err))
            continue
        if example.id in places:  # paired statistics match answers by id: an id must name one example
            raise FlexmoeError(f"{path}:{where}: duplicate id {example.id!r} (also on {places[example.id]}); "
                               f"ids must be unique (without an id field every row gets its own)")
        places[example.id] = where
        examples.append(example)
    _check_mapped_keys(fields, keys, path)
    return examples, invalid


def _check_mapped_keys(fields: Mapping[str, str] | None, keys: set[str], path: Path) -> None:
    """A mapped key that no row has is a mistyped name: an optional field would stay empty unsaid."""
    for name, key in (fields or {}).items():
        if keys and key not in keys:
            shown = sorted(keys, key=str)
            listed = ", ".join(shown[:MAX_REPORTED]) + (f", ... ({len(shown)} keys)" if len(shown) > MAX_REPORTED else "")
            raise FlexmoeError(f"{path}: field mapping {name}={key}: no row has the key {key!r}; "
                               f"the file's keys: {listed}")


def _with_id(example: Example, row: int) -> Example:
    """The example, with an id of its own where the file gives none: its row (the record's place in
    the file, invalid rows counted, so in any format and with or without skip_invalid) and a hash of
    its text, the same for every run, method and seed on this file."""
    if example.id:
        return example
    text = "\0".join((example.instruction, example.context, example.response))
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]
    return dataclasses.replace(example, id=f"row-{row}-{digest}")


def invalid_rows_message(invalid: list[str]) -> str:
    """One row: its own one-line message; several: the count, then the first MAX_REPORTED."""
    if len(invalid) == 1:
        return invalid[0]
    shown = "\n".join(f"  {message}" for message in invalid[:MAX_REPORTED])
    more = f"\n  ... and {len(invalid) - MAX_REPORTED} more" if len(invalid) > MAX_REPORTED else ""
    return (f"{len(invalid)} invalid rows (fix them, or set data.skip_invalid = true to train on "
            f"the valid rows):\n{shown}{more}")


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "hf"
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".json":
        return "json"
    if suffix == ".jsonl":
        return "jsonl"
    if not path.exists():
        raise FlexmoeError(f"data path {path} does not exist")
    raise FlexmoeError(f"cannot tell the format of {path} from its name; pass a format "
                       f"({', '.join(FORMATS)})")


def _field_mapping(format: str, fields: Mapping[str, str] | None) -> dict[str, tuple[str, ...]]:
    """Example field → candidate source keys, first present wins."""
    unknown = sorted(set(fields or {}) - set(EXAMPLE_FIELDS))
    if unknown:
        raise FlexmoeError(f"unknown field mapping key {unknown[0]!r}; valid: {', '.join(EXAMPLE_FIELDS)}")
    for name, key in (fields or {}).items():
        if not isinstance(key, str) or not key:
            raise FlexmoeError(f"field mapping {name!r} must name a key (a non-empty string), got {key!r}")
    fixed = _FORMAT_FIELDS.get(format)
    mapping = {}
    for name in EXAMPLE_FIELDS:
        if fields and name in fields:
            mapping[name] = (fields[name],)
        elif fixed is not None:
            mapping[name] = (fixed[name],) if name in fixed else ()
        else:
            mapping[name] = _ALIASES[name]
    return mapping


def _to_example(record: object, mapping: dict[str, tuple[str, ...]], path: Path, where: str) -> Example:
    if not isinstance(record, dict):
        raise FlexmoeError(f"{path}:{where}: expected a JSON object, got {type(record).__name__}")
    values = {}
    for name, keys in mapping.items():
        key = next((key for key in keys if key in record), None)
        if key is None:
            if name in REQUIRED_FIELDS:
                raise FlexmoeError(f"{path}:{where}: missing field {'/'.join(keys)!r} ({name})")
            continue
        values[name] = _text_value(record[key], key, name, path, where)
    for name in REQUIRED_FIELDS:
        if not values[name].strip():
            raise FlexmoeError(f"{path}:{where}: field {mapping[name][0]!r} ({name}) is empty")
    return Example(**values)


def _text_value(value: object, key: str, name: str, path: Path, where: str) -> str:
    if value is None and name not in REQUIRED_FIELDS:
        return ""
    if name == "id" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise FlexmoeError(f"{path}:{where}: field {key!r} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON can spell lone surrogates ("\ud800"); tokenizers cannot take them
        raise FlexmoeError(f"{path}:{where}: field {key!r} contains an invalid Unicode escape") from None
    return value


# ---------------------------------------------------------------- record readers


def _records(path: Path, format: str) -> Iterator[tuple[str, object]]:
    """(location, record) pairs; location is `line N` for text files, `row N` for tables."""
    if format == "parquet":
        return _parquet_records(path)
    if format == "hf":
        return _hf_records(path)
    text = _read_text(path)
    if format == "alpaca" or (format == "json" and text.lstrip().startswith("[")):
        return _json_array_records(text, path)
    return _json_lines_records(text, path)


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise FlexmoeError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise FlexmoeError(f"{path}:line {line}: not UTF-8 text") from None


class _Invalid:
    """A record that could not be parsed; reported with the other invalid rows."""

    def __init__(self, reason: str):
        self.reason = reason


def _json_lines_records(text: str, path: Path) -> Iterator[tuple[str, object]]:
    # "\n" only: str.splitlines() also splits at U+2028/U+2029/U+0085, which JSON strings may
    # hold raw (json.dumps(..., ensure_ascii=False) writes them); a "\r" before "\n" is JSON space.
    for line_no, line in enumerate(text.split("\n"), 1):
        if line.strip():
            yield f"line {line_no}", _parse_json(line)


def _parse_json(line: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        return _Invalid(f"malformed JSON ({err.msg}, column {err.colno})")
    except RecursionError:
        return _Invalid("JSON nested too deeply")


def _json_array_records(text: str, path: Path) -> Iterator[tuple[str, object]]:
    """Elements of a top-level JSON array, each with the line it starts on."""
    decoder = json.JSONDecoder()
    lines = _LineCounter(text)
    position = _skip_space(text, 0)
    if not text.startswith("[", position):
        raise FlexmoeError(f"{path}:line {lines.at(position)}: expected a JSON array of objects")
    position = _skip_space(text, position + 1)
    if text.startswith("]", position):
        return
    while True:
        line = lines.at(position)
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as err:
            raise FlexmoeError(f"{path}:line {err.lineno}: malformed JSON ({err.msg}, column {err.colno})") from None
        except RecursionError:
            raise FlexmoeError(f"{path}:line {line}: JSON nested too deeply") from None
        yield f"line {line}", record
        position = _skip_space(text, position)
        if text.startswith("]", position):
            break
        if not text.startswith(",", position):
            raise FlexmoeError(f"{path}:line {lines.at(position)}: malformed JSON (expected ',' or ']')")
        position = _skip_space(text, position + 1)
    trailing = _skip_space(text, position + 1)
    if trailing != len(text):
        raise FlexmoeError(f"{path}:line {lines.at(trailing)}: malformed JSON (text after the array)")


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


class _LineCounter:
    """Line numbers of increasing positions in a text, counted incrementally (large files)."""

    def __init__(self, text: str):
        self.text, self.position, self.line = text, 0, 1

    def at(self, position: int) -> int:
        self.line += self.text.count("\n", self.position, position)
        self.position = position
        return self.line


def _parquet_records(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except FileNotFoundError:
        raise FlexmoeError(f"data path {path} does not exist") from None
    except (OSError, pyarrow.ArrowException) as err:
        raise FlexmoeError(f"cannot read parquet file {path}: {err}") from None
    for row_no, row in enumerate(rows, 1):
        yield f"row {row_no}", row


def _hf_records(path: Path) -> Iterator[tuple[str, object]]:
    try:
        import datasets
    except ImportError:
        raise FlexmoeError(f"{path}: reading a datasets.save_to_disk directory needs the optional "
                           "`datasets` package (pip install 'flexmoe[datasets]')") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as err:
        raise FlexmoeError(f"cannot read {path} as a datasets.save_to_disk directory: {err}") from None
    if isinstance(loaded, datasets.DatasetDict):
        split = "train" if "train" in loaded else (next(iter(loaded)) if len(loaded) == 1 else None)
        if split is None:
            raise FlexmoeError(f"{path}: several splits ({', '.join(loaded)}) and none named 'train'")
        loaded = loaded[split]
    for row_no, row in enumerate(loaded, 1):
        yield f"row {row_no}", row

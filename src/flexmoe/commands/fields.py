"""The `--field NAME=KEY` option of the commands that read a data file without a run config
(the config's counterpart is `data.fields`). Light: imported while the CLI parser is built."""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from flexmoe.errors import FlexmoeError


def add_field_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--field", action="append", default=[], metavar="NAME=KEY",
                        help="map an example field to the file's key, e.g. response=answer (repeatable)")


def parse_fields(pairs: list[str]) -> Mapping[str, str] | None:
    """`["response=answer", ...]` -> {"response": "answer", ...}; None when empty."""
    mapping = {}
    for pair in pairs:
        name, sep, key = pair.partition("=")
        if not sep or not name.strip() or not key.strip():
            raise FlexmoeError(f"--field {pair!r}: expected NAME=KEY, e.g. response=answer")
        mapping[name.strip()] = key.strip()
    return mapping or None

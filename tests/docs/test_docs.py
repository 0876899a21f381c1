"""The user guide's commands and config parse with the real CLI and config model."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

from helpers.paths import REPO_ROOT

GUIDE = REPO_ROOT / "docs" / "guide.md"
GPU_GUIDE = GUIDE.with_name("gpu.md")


def code_blocks(language: str, page: Path = GUIDE) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(), flags=re.S)


def guide_commands(page: Path = GUIDE) -> list[list[str]]:
    """Every `flexmoe ...` line of a page's bash blocks, as argv (continuations joined, comments dropped)."""
    commands = []
    for block in code_blocks("bash", page):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] in ("flexmoe", ".venv/bin/flexmoe"):
                commands.append(words[1:])
    return commands


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="flexmoe")
    module = importlib.import_module(f"flexmoe.commands.{argv[0]}")
    sub = parser.add_subparsers(dest="command")
    module.add_arguments(sub.add_parser(argv[0]))
    return parser.parse_args(argv)


def test_the_guide_shows_every_usage_command():
    used = {argv[0] for argv in guide_commands() if argv}
    assert {"run", "data", "graft", "generate", "eval", "export"} <= used


@pytest.mark.parametrize("argv", guide_commands(), ids=" ".join)
def test_guide_command_parses(argv, capsys):
    try:
        parse(argv)
    except SystemExit:
        pytest.fail(f"`flexmoe {' '.join(argv)}` does not parse: {capsys.readouterr().err.strip()}")


def test_guide_config_is_valid(tmp_path):
    from flexmoe.config import load_config

    (block,) = [b for b in code_blocks("toml") if "method" in b]  # the worked example (test_guide.py runs all)
    path = tmp_path / "dolly-flex.toml"
    path.write_text(block)
    config = load_config(path)
    assert config.method == "flex" and config.data.by == "category" and config.num_clients == 8


@pytest.mark.parametrize("argv", guide_commands(GPU_GUIDE), ids=" ".join)
def test_gpu_page_command_parses_and_its_settings_exist(argv, capsys):
    from flexmoe.config import valid_keys

    try:
        args = parse(argv)
    except SystemExit:
        pytest.fail(f"`flexmoe {' '.join(argv)}` does not parse: {capsys.readouterr().err.strip()}")
    for item in getattr(args, "overrides", None) or getattr(args, "set", None) or []:
        assert item.split("=", 1)[0] in valid_keys()

"""The `flexmoe` entry point: help lists every command; user errors are one line, exit 2."""

import subprocess
import sys

from flexmoe import cli


def _flexmoe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flexmoe.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_registered_command():
    result = _flexmoe("--help")
    assert result.returncode == 0, result.stderr
    for name in cli.COMMANDS:  # a long name (personalize) has its help on the next line
        assert f"\n    {name} " in result.stdout or f"\n    {name}\n" in result.stdout, name


def test_no_command_prints_help_and_fails():
    result = _flexmoe()
    assert result.returncode == 2
    assert "COMMAND" in result.stdout


def test_user_error_is_one_line_with_exit_2(tmp_path):
    missing = tmp_path / "nope.toml"
    result = _flexmoe("run", "--config", str(missing))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("flexmoe run: error:") and str(missing) in lines[0]
    assert "Traceback" not in result.stderr

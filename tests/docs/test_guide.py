"""The user guide's data examples work as written: its `flexmoe data` and `flexmoe graft` command
lines and its run configs, on small local stand-ins for the files and the model it names."""

from __future__ import annotations

import json
import re
import shlex

import pytest

from flexmoe import cli
from flexmoe.config import load_config
from flexmoe.clients import partition_data
from helpers.paths import REPO_ROOT

GUIDE = REPO_ROOT / "docs" / "guide.md"
DOLLY_CATEGORIES = ("open_qa", "general_qa", "classification", "closed_qa", "brainstorming",
                    "information_extraction", "summarization", "creative_writing")


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", GUIDE.read_text(), flags=re.S)


@pytest.fixture
def stand_ins(tmp_path, tiny_model_dir) -> dict[str, str]:
    """The guide's paths -> files of the same shape here."""
    dolly = tmp_path / "dolly.jsonl"
    dolly.write_text("".join(json.dumps({"instruction": f"q{i}", "context": "", "response": f"a{i}",
                                         "category": DOLLY_CATEGORIES[i % 8]}) + "\n" for i in range(80)))
    support = tmp_path / "support.jsonl"
    support.write_text("".join(json.dumps({"ticket": f"t{i}", "reply": f"r{i}"}) + "\n" for i in range(20)))
    return {"~/data/dolly.jsonl": str(dolly), "/home/me/data/dolly.jsonl": str(dolly),
            "~/data/support.jsonl": str(support), "/home/me/data/support.jsonl": str(support),
            "~/models/olmoe-1b-7b": str(tiny_model_dir), "/home/me/models/olmoe-1b-7b": str(tiny_model_dir)}


def substitute(text: str, paths: dict[str, str]) -> str:
    for guide_path, here in paths.items():
        text = text.replace(guide_path, here)
    return text


def test_the_guides_data_and_graft_commands_run(stand_ins, capsys):
    lines = [line.split("#")[0].strip() for block in blocks("bash") for line in block.splitlines()]
    commands = [line for line in lines if line.startswith(("flexmoe data ", "flexmoe graft "))]
    assert len(commands) >= 4 and any("--field" in line for line in commands)
    for line in commands:
        assert cli.main(shlex.split(substitute(line, stand_ins))[1:]) == 0, line
    capsys.readouterr()


def test_the_guides_run_configs_read_their_data(stand_ins, tmp_path):
    configs = [block for block in blocks("toml") if "[data]" in block]
    assert len(configs) >= 2
    for index, block in enumerate(configs):
        path = tmp_path / f"guide-{index}.toml"
        path.write_text(substitute(block, stand_ins))
        config = load_config(path)
        parts = partition_data(config)
        rows = sum(len(part.train) + len(part.test) for part in parts)
        assert rows == (80 if "dolly" in config.data.source else 20)  # every row, mapped keys included
    # the guide's command-line form of the mapping
    config = load_config(None, [f"data.source={stand_ins['~/data/support.jsonl']}", "data.fields.instruction=ticket",
                                "data.fields.response=reply", "num_clients=2", "data.partition=iid"])
    assert config.clients_per_round == 2 and sum(len(p.train) for p in partition_data(config)) > 0

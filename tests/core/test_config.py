"""Run config: TOML + --set, one-line errors naming the key, resolved config round trip."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flexmoe.cli import main
from flexmoe.config import RunConfig, load_config, save_config, valid_keys
from flexmoe.errors import FlexmoeError
from helpers.paths import REPO_ROOT

CONFIGS = REPO_ROOT / "configs"


def test_defaults_are_flex_on_the_shipped_tiny_base():
    config = load_config()
    assert (config.method, config.model, config.data.source, config.data.partition) == \
        ("flex", "tiny", "builtin", "pathological")


def test_overrides_parse_toml_values_and_dotted_keys():
    config = load_config(None, ["train.lr=3e-4", "flex.federate_routers=true", "method=fedprox",
                                'model="/models/my dir"', "data.source=some/file.jsonl"])
    assert config.train.lr == 3e-4 and config.flex.federate_routers is True
    assert config.method == "fedprox" and config.model == "/models/my dir"
    assert config.data.source == "some/file.jsonl"  # an unquoted path is taken as a string


def test_overrides_beat_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('method = "fedavg"\nrounds = 7\n[train]\nlr = 0.01\n')
    config = load_config(path, ["train.lr=0.02"])
    assert (config.method, config.rounds, config.train.lr) == ("fedavg", 7, 0.02)


@pytest.mark.parametrize("override, expected", [
    ("train.lrr=1", "unknown config key 'train.lrr'; did you mean train.lr"),
    ("rouns=3", "unknown config key 'rouns'; did you mean rounds"),
    ("flex.gat=none", "did you mean flex.gate"),
])
def test_unknown_key_names_it_and_the_closest_keys(override, expected):
    with pytest.raises(FlexmoeError, match=expected.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nlocal_step = 3\n")
    with pytest.raises(FlexmoeError, match=rf"{path.name}: unknown config key 'train.local_step'; did you mean "
                                           r"train.local_steps"):
        load_config(path)


@pytest.mark.parametrize("override, expected", [
    ("train.lr=-1", "config key train.lr = -1: Input should be greater than 0"),
    ("method=fedx", "config key method = 'fedx': Input should be 'flex', 'fedavg'"),
    ("flex.gate=open", "Input should be 'sigmoid' or 'none'"),
    ("rounds=0", "config key rounds = 0: Input should be greater than or equal to 1"),
    ("clients_per_round=9", "clients_per_round = 9 must be at most num_clients = 4"),
    ("train=3", "'train' is a section"),
    ("train.lr", "expected KEY=VALUE"),
    ("data.fields.answer=reply", "unknown example field 'answer'; valid: instruction, response"),
])
def test_bad_values_give_the_allowed_range(override, expected):
    with pytest.raises(FlexmoeError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert expected in message and "\n" not in message


def test_clients_per_round_defaults_to_every_client():
    assert load_config(None, []).clients_per_round == 4
    assert load_config(None, ["num_clients=2"]).clients_per_round == 2  # the most common override alone
    assert load_config(None, ["num_clients=6", "clients_per_round=3"]).clients_per_round == 3
    assert load_config(None, ["num_clients=3", "clients_per_round=0"]).clients_per_round == 3


def test_field_mapping_is_a_config_key(tmp_path):
    assert load_config(None, ["data.fields.response=reply"]).data.fields == {"response": "reply"}
    path = tmp_path / "run.toml"
    path.write_text('[data]\nsource = "x.jsonl"\nfields = {instruction = "question", response = "answer"}\n')
    config = load_config(path)
    assert config.data.fields == {"instruction": "question", "response": "answer"}
    saved = tmp_path / "saved.toml"
    save_config(config, saved)
    assert load_config(saved) == config


def test_invalid_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("rounds = = 3\n")
    with pytest.raises(FlexmoeError, match="broken.toml: invalid TOML"):
        load_config(path)
    with pytest.raises(FlexmoeError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_resolved_config_round_trips(tmp_path):
    config = load_config(None, ["method=scaffold", "train.lr=0.05", "flex.k=2", "seed=9"])
    save_config(config, tmp_path / "config.toml")
    assert load_config(tmp_path / "config.toml") == config


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS.glob("*.toml") if not p.name.startswith("pretrain")),
                         ids=lambda p: p.name)
def test_shipped_run_configs_are_valid(path):
    assert isinstance(load_config(path), RunConfig)


def test_valid_keys_cover_every_section():
    keys = valid_keys()
    for key in ("method", "rounds", "num_clients", "clients_per_round", "seed", "model", "data.partition",
                "train.local_steps", "flex.gate", "fedprox.mu", "server.tau", "eval.max_new_tokens"):
        assert key in keys
    # each method's section (declared beside it, methods/<method>/config.py) is a section of the run
    # config, and each declared method has its implementation (methods/<method>/method.py)
    from flexmoe.methods import registered
    from flexmoe.methods.build import method_class

    for name, info in registered().items():
        assert info.section is None or info.section in RunConfig.model_fields
        assert method_class(name).name == name
    # and reading and checking a config loads no model code (torch)
    code = "import sys, flexmoe.config as c; c.load_config(None, ['method=scaffold']); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_cli_reports_a_bad_key_on_one_line(capsys):
    assert main(["run", "--set", "train.lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown config key 'train.lrr'" in err


def test_cli_refuses_to_resume_a_directory_without_a_run(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "not a resumable run directory" in capsys.readouterr().err

"""Bad input never costs a traceback: fuzzed configs (TOML text, `--set` overrides) give a valid
config or one FlexmoeError line; a dense model, a mismatched tokenizer, an empty dataset, an
unwritable or full output directory each end `flexmoe run` with one line, exit 2 and no
half-written file."""

from __future__ import annotations

import errno
import json
import os
import string
import tempfile
from pathlib import Path

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexmoe.cli import main
from flexmoe.config import RunConfig, load_config, save_config, valid_keys
from flexmoe.errors import FlexmoeError
from flexmoe.files import load_checked

from helpers.engine import build_tokenizer, metrics, synthetic_examples

KEYS = valid_keys()
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def config_or_one_line(load) -> RunConfig | None:
    """`load()`'s config, or None after a one-line FlexmoeError; any other exception fails."""
    try:
        config = load()
    except FlexmoeError as err:
        assert str(err) and "\n" not in str(err), repr(str(err))
        return None
    assert isinstance(config, RunConfig)
    return config


def round_trips(config: RunConfig) -> None:
    """An accepted config is written to a run directory and read back unchanged."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "config.toml"
        save_config(config, path)
        assert load_config(path) == config


# ---- config fuzzing ------------------------------------------------------------------------------
values = st.one_of(
    st.integers(min_value=-10**20, max_value=10**20).map(str),
    st.floats().map(lambda x: {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(str(x), repr(x))),
    st.booleans().map(lambda b: str(b).lower()),
    st.text(max_size=12).map(json.dumps),  # a quoted TOML string
    st.text(alphabet=string.printable, max_size=12),  # bare text
    st.lists(st.integers(-3, 3), max_size=3).map(str),
    st.sampled_from(["{}", "[[]]", "{a = 1}", '"flex"', '"fedavg"', "0", "-1", "1e309", "0.5", "''"]),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(alphabet=string.ascii_lowercase + "._=", max_size=20))


@FUZZ
@given(st.lists(st.tuples(keys, values).map("=".join), max_size=4))
def test_fuzzed_overrides_give_a_config_or_one_line(overrides):
    config = config_or_one_line(lambda: load_config(None, overrides))
    if config is not None:
        round_trips(config)


@FUZZ
@given(st.lists(st.text(max_size=30), max_size=3))
def test_arbitrary_override_text_gives_a_config_or_one_line(overrides):
    config_or_one_line(lambda: load_config(None, overrides))


toml_values = st.recursive(
    st.one_of(st.integers(-5, 10**6), st.floats(allow_nan=True), st.booleans(), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)),
    max_leaves=6,
)


@FUZZ
@given(st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)), toml_values, max_size=5)
       .map(tomli_w.dumps))
def test_fuzzed_toml_files_give_a_config_or_one_line(text):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "run.toml"
        path.write_text(text)
        config = config_or_one_line(lambda: load_config(path))
    if config is not None:
        round_trips(config)


@FUZZ
@given(st.one_of(st.binary(max_size=60), st.text(max_size=60).map(str.encode)))
def test_arbitrary_config_bytes_give_a_config_or_one_line(blob):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "run.toml"
        path.write_bytes(blob)
        config_or_one_line(lambda: load_config(path))


@pytest.mark.parametrize("item", ["train.lr=nan", "flex.gate_init_bias=inf", "fcmoe.retention=-inf",
                                  "flex.gate_init_bias=nan"])
def test_non_finite_numbers_are_refused(item):
    with pytest.raises(FlexmoeError, match=item.split("=")[0]):
        load_config(None, [item])


def test_a_config_path_that_is_a_directory_is_one_line(tmp_path):
    config_or_one_line(lambda: load_config(tmp_path))
    with pytest.raises(FlexmoeError, match="config file"):
        load_config(tmp_path)


# ---- bad models, data and output directories through the CLI -------------------------------------
def cli_error(capsys, argv: list[str]) -> str:
    """Run `flexmoe ARGV`, expect exit 2; returns its one error line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("flexmoe ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "examples.jsonl"
    path.write_text("".join(json.dumps(e.__dict__) + "\n" for e in synthetic_examples()))
    return path


def small_run(model: str, data: Path, *extra: str) -> list[str]:
    settings_ = [f"model={model}", f"data.source={data}", "rounds=2", "num_clients=4", "clients_per_round=2",
                 "train.local_steps=2", "train.batch_size=4", "train.max_length=64", "lora.r=2",
                 "flex.calibration_examples=4", "eval.max_test_examples=2", "eval.max_new_tokens=4",
                 "eval.knowledge=false", "eval.base=false", "data.test_fraction=0.2", *extra]
    return ["run", "--quiet", *[arg for item in settings_ for arg in ("--set", item)]]


def test_a_dense_model_is_one_line(tmp_path, capsys, data_file):
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = build_tokenizer(tmp_path / "dense")
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "dense")
    line = cli_error(capsys, [*small_run(str(tmp_path / "dense"), data_file), "--output-dir", str(tmp_path / "out")])
    assert "'llama' model, not a supported Mixture-of-Experts family" in line and str(tmp_path / "dense") in line
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_that_does_not_match_the_model_is_one_line(tmp_path, capsys, data_file):
    from helpers.tiny import tiny_model

    vocab = build_tokenizer(tmp_path / "small")
    tiny_model("qwen2_moe", vocab_size=16).save_pretrained(tmp_path / "small")
    line = cli_error(capsys, [*small_run(str(tmp_path / "small"), data_file), "--output-dir", str(tmp_path / "out")])
    assert f"the tokenizer has {vocab} tokens but the model embeds only 16" in line


@pytest.mark.parametrize("content", ["", "\n\n", "[]"])
def test_an_empty_dataset_is_one_line(tmp_path, capsys, model_dir, content):
    empty = tmp_path / ("empty.json" if content == "[]" else "empty.jsonl")
    empty.write_text(content)
    line = cli_error(capsys, [*small_run(model_dir, empty), "--output-dir", str(tmp_path / "out")])
    assert str(empty) in line and "no examples" in line


def test_an_unwritable_output_directory_is_one_line(tmp_path, capsys, model_dir, data_file):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    line = cli_error(capsys, [*small_run(model_dir, data_file), "--output-dir", str(blocker / "run")])
    assert line.startswith("flexmoe run: error: cannot write ") and str(blocker / "run") in line
    assert "Not a directory" in line and blocker.read_text() == "not a directory"


def no_partial_files(run_dir: Path) -> None:
    """No temporary left; every tensor file intact; every metrics line whole."""
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]
    for path in run_dir.rglob("*.safetensors"):
        load_checked(path)
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


@pytest.mark.slow
def test_a_full_disk_mid_run_is_one_line_leaves_no_partial_file_and_resumes(tmp_path, capsys, model_dir,
                                                                            data_file, monkeypatch):
    """The disk fills up while round 2's checkpoint is written: exit 2 with one line naming
    the file; the run directory holds round 1 intact and `--resume` finishes it to the same
    metrics as an uninterrupted run."""
    replace, saved = os.replace, []

    def disk_full_at_round_2_checkpoint(src, dst):
        if str(dst).endswith("server.safetensors"):
            saved.append(dst)
            if len(saved) == 3:  # round 0, round 1, then round 2
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        replace(src, dst)

    main([*small_run(model_dir, data_file), "--output-dir", str(tmp_path / "full")])
    monkeypatch.setattr(os, "replace", disk_full_at_round_2_checkpoint)
    line = cli_error(capsys, [*small_run(model_dir, data_file), "--output-dir", str(tmp_path / "cut")])
    assert line == (f"flexmoe run: error: cannot write '{tmp_path / 'cut' / 'checkpoints' / 'server.safetensors'}': "
                    "No space left on device")
    monkeypatch.setattr(os, "replace", replace)
    no_partial_files(tmp_path / "cut")
    assert main(["run", "--quiet", "--resume", str(tmp_path / "cut")]) == 0
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "full")
    no_partial_files(tmp_path / "cut")


def test_a_full_disk_at_the_first_write_is_one_line(tmp_path, capsys, model_dir, data_file, monkeypatch):
    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", disk_full)
    line = cli_error(capsys, [*small_run(model_dir, data_file), "--output-dir", str(tmp_path / "run")])
    assert line == f"flexmoe run: error: cannot write '{tmp_path / 'run' / 'config.toml'}': No space left on device"
    assert [p for p in (tmp_path / "run").rglob("*") if p.is_file()] == []

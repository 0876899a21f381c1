"""Fixtures shared by test modules in several folders: the session's saved tiny models, the engine
tests' synthetic builtin data, and the usage tests' Dolly file and FLEx run. Fixtures that build
models are session-scoped and read-only. A folder's own conftest.py holds the fixtures only its
modules use (models/: the tiny model of every family; flower/: the Flower run config; pretrain/:
the corpus); plain functions and constants live in helpers/ (tiny models in helpers/tiny.py, the
engine tests' world in helpers/engine.py, the usage tests' in helpers/usage.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers.engine import build_tokenizer, synthetic_examples
from helpers.tiny import save_tokenizer, tiny_model
from helpers.usage import train, write_dolly

# Tiny tensors gain nothing from intra-op threads, and on a busy machine idle OpenMP workers
# spinning for a core made a tiny forward pass ~400x slower (3.5 s vs 8 ms, measured).
torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """Under pytest-xdist's loadgroup scheduling, the tests of one Flower module run on one worker:
    they share module-scoped deployments, which would otherwise be started once per worker."""
    for item in items:
        if item.get_closest_marker("flower") is not None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


@pytest.fixture(scope="session")
def saved_tiny_model(tmp_path_factory) -> str:
    """The tiny qwen2_moe (seed 0) with the engine tests' word-level tokenizer, saved once for the
    whole session: the model folder the end-to-end tests run on. Read-only: a test that changes a
    model folder saves its own."""
    path = tmp_path_factory.mktemp("tiny-qwen2moe")
    vocab = build_tokenizer(path)
    tiny_model("qwen2_moe", vocab_size=vocab, max_position_embeddings=128).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny qwen2_moe with its tokenizer over the tiny vocabulary: a local Hugging Face
    model directory, saved once for the session (read-only)."""
    directory = tmp_path_factory.mktemp("tiny-qwen2-moe")
    tiny_model("qwen2_moe").save_pretrained(directory)
    save_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def model_dir(saved_tiny_model) -> str:
    return saved_tiny_model  # what save_model(path, seed=0) saves


@pytest.fixture
def builtin_is_synthetic(monkeypatch):
    """The engine reads `data.source = "builtin"`; here it gets the small synthetic set (a module
    asks for it with `pytestmark = pytest.mark.usefixtures("builtin_is_synthetic")`)."""
    import flexmoe.data

    monkeypatch.setattr(flexmoe.data, "builtin_examples", synthetic_examples)


# ---- the usage tests: a Dolly file and a FLEx run on it ----------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory, request) -> Path:
    return tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_"))


@pytest.fixture(scope="module")
def data_file(workdir) -> Path:
    return write_dolly(workdir / "dolly.jsonl")


@pytest.fixture(scope="module")
def flex_run(workdir, model_dir, data_file) -> Path:
    return train(model_dir, data_file, workdir / "flex-run")

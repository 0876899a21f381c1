"""The pretraining tests' corpus files: 300 synthetic training documents and 40 held out."""

from __future__ import annotations

import pytest

from helpers.corpus import corpus_documents


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    (directory / "train.txt").write_text("\n".join(corpus_documents(300, 0)) + "\n", encoding="utf-8")
    (directory / "heldout.txt").write_text("\n".join(corpus_documents(40, 1)) + "\n", encoding="utf-8")
    return directory

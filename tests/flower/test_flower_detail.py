"""Per-example evaluation files travel with a Flower evaluation reply (no Flower process needed)."""

from __future__ import annotations

import json

import pytest

from flexmoe.engine.flower.messages import pack_detail, unpack_detail
from flexmoe.errors import FlexmoeError


def test_detail_files_round_trip_into_the_run_directory(tmp_path):
    client_side = tmp_path / "client"
    files = {"round-2/personal-client-1.json": {"ids": ["a"], "rouge_l": [0.5]},
             "round-2/global-client-1.json": {"ids": ["a"], "rouge_l": [0.25]},
             "round-2/personal-client-1-knowledge.json": {"doc_nll": [[1.0, 2]]}}
    for name, payload in files.items():
        (client_side / name).parent.mkdir(parents=True, exist_ok=True)
        (client_side / name).write_text(json.dumps(payload))
    packed = json.loads(json.dumps(pack_detail(client_side)))  # as the ConfigRecord carries it
    assert sorted(packed) == sorted(files)
    unpack_detail(packed, client_id=1, round_index=2, root=tmp_path / "run" / "evals")
    for name, payload in files.items():
        assert json.loads((tmp_path / "run" / "evals" / name).read_text()) == payload


@pytest.mark.parametrize("name", ["round-2/personal-client-0.json", "round-1/personal-client-1.json",
                                  "../../config.toml", "round-2/../../x-client-1.json", "round-2/base-knowledge.json"])
def test_a_reply_cannot_write_another_clients_or_rounds_file(tmp_path, name):
    with pytest.raises(FlexmoeError, match="client 1 sent an evaluation file"):
        unpack_detail({name: "{}"}, client_id=1, round_index=2, root=tmp_path / "evals")
    assert not list(tmp_path.rglob("*.json"))

"""What travels between the Flower ServerApp and ClientApps, and how its size is counted.

Tensors travel as one `ArrayRecord` ("arrays"); the resolved flexmoe config, the round, the last
committed round and every client's last counted round as a `ConfigRecord` ("config"); a client's
metrics record as JSON in a `ConfigRecord` ("result"; JSON keeps floats exact and carries nested values), with Flower's
`num-examples` in a `MetricRecord` ("metrics"); an evaluation reply also carries the client's
per-example result files (`eval/detail.py`) as JSON in a `ConfigRecord` ("detail"), which the
server keeps in the run directory as the in-process engine does. Communication is counted as the bytes of the ArrayRecord as
Flower serialises it: every distinct object of its tree (each Array, then the record), once,
because Flower transfers content-addressed objects and sends identical arrays only once.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import tomli_w
import torch

from flexmoe.config import RunConfig
from flexmoe.errors import FlexmoeError
from flexmoe.tensors import Tensors

ARRAYS, GLOBAL, CONFIG, METRICS, RESULT, DETAIL = "arrays", "global", "config", "metrics", "result", "detail"
COUNTED_ROUNDS = "counted-rounds"  # config key: {client id: its last round the server counted}, as JSON
DETAIL_NAME = re.compile(r"round-(\d+)/([a-z-]+)-client-(\d+)(-knowledge)?\.json")


def pack_detail(root: Path) -> dict[str, str]:
    """A client's per-example files under `root` (`evals/`'s layout): {relative path: text}."""
    return {path.relative_to(root).as_posix(): path.read_text() for path in sorted(root.glob("round-*/*.json"))}


def unpack_detail(files: dict[str, str], client_id: int, round_index: int, root: Path) -> None:
    """Keep a client's per-example files under the run's `root` (`evals/`): only files of that
    client and round, named as `eval/detail.py` names them (a reply cannot write elsewhere)."""
    from flexmoe.files import write_text_atomic

    for name, text in files.items():
        match = DETAIL_NAME.fullmatch(name)
        if not match or int(match[1]) != round_index or int(match[3]) != client_id:
            raise FlexmoeError(f"client {client_id} sent an evaluation file {name!r} not of its own round {round_index}")
        write_text_atomic(root / name, text)


def config_text(config: RunConfig) -> str:
    return tomli_w.dumps(config.model_dump(mode="json"))


def config_from_text(text: str) -> RunConfig:
    return RunConfig.model_validate(tomllib.loads(text))


def counted_rounds_text(counted: dict[int, int]) -> str:
    return json.dumps({str(client): round_index for client, round_index in sorted(counted.items())})


def counted_round(settings, client_id: int) -> int:
    """The last round of `client_id` the server counted (0: none), from a message's config."""
    return int(json.loads(str(settings[COUNTED_ROUNDS])).get(str(client_id), 0))


def to_arrays(tensors: Tensors):
    """An ArrayRecord of CPU tensors; bfloat16 (which ArrayRecord rejects) travels as float32."""
    from flwr.app import ArrayRecord

    state = {name: (t.float() if t.dtype == torch.bfloat16 else t).detach().cpu().contiguous()
             for name, t in tensors.items()}
    return ArrayRecord(state)


def from_arrays(record) -> Tensors:
    return {name: tensor.clone() for name, tensor in record.to_torch_state_dict().items()}


def record_bytes(record) -> int:
    """Serialised bytes of an ArrayRecord as Flower transfers it (distinct objects once)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(record).values())


def parse_overrides(text: str) -> list[str]:
    """The run-config `set` value: `key=value` items separated by ';'."""
    items = [item.strip() for item in text.split(";") if item.strip()]
    for item in items:
        if "=" not in item:
            raise FlexmoeError(f"run config 'set': {item!r} is not KEY=VALUE (items are separated by ';')")
    return items

"""What a run tells its user while it works: every long step announced through the progress
display, the partition as "N of M rows", truncation counted in the log and the report."""

from __future__ import annotations

import json

import pytest

from flexmoe.engine.progress import Progress, logs_to
from flexmoe.engine.simulation import Simulation

from helpers.engine import engine_config

pytestmark = pytest.mark.usefixtures("builtin_is_synthetic")


class Recorder(Progress):
    def __init__(self):
        self.lines = []

    def message(self, text: str) -> None:
        self.lines.append(text)


def test_a_run_announces_its_steps_counts_rows_and_truncation(model_dir, tmp_path):
    progress = Recorder()
    config = engine_config(model_dir, "rounds=1", "clients_per_round=0", "train.max_length=24", "eval.base=true")
    with logs_to(progress):
        Simulation(config, tmp_path, progress).run()
    text = "\n".join(progress.lines)
    for step in ("loading the base model", "reading the data: the builtin WordNet dataset",
                 "round 0: evaluating the base model on client 0", "grafting client 3", "round 1: evaluating client 3"):
        assert step in text, step
    assert "partition: 4 clients: 48 of 48 rows (" in text  # 4 synthetic domains x 12, none dropped
    assert sum(line.startswith("partition: client") and " of 48 rows " in line for line in progress.lines) == 4
    assert "training examples longer than train.max_length = 24 were cut" in text
    clients = json.loads((tmp_path / "clients.json").read_text())
    assert all(client["truncated"] == client["num_train"] > 0 for client in clients)  # the prompt alone is longer
    assert all(client["unusable"] == 0 for client in clients)
    report = (tmp_path / "report.md").read_text()
    assert "train.max_length = 24 tokens: " in report and "0 were left with no supervised token" in report


def test_logs_to_restores_the_logger():
    import logging

    logger = logging.getLogger("flexmoe")
    before = (logger.level, list(logger.handlers))
    progress = Recorder()
    with logs_to(progress):
        logging.getLogger("flexmoe.data").info("seen")
    logging.getLogger("flexmoe.data").info("not seen")
    assert progress.lines == ["seen"] and (logger.level, list(logger.handlers)) == before

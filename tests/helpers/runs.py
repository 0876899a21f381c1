"""Finished run directories as the engine writes them, for the report and statistics tests."""

from __future__ import annotations

import json
from pathlib import Path

from flexmoe.eval.detail import write_detail


LOAD = {"layers.0.mlp": [0.5, 0.5, 0.0, 0.0], "layers.1.mlp": [0.25, 0.25, 0.25, 0.25]}


def write_run(path: Path, method: str, seed: int, rouge: list[float], knowledge: float, extra: str = "") -> Path:
    """A finished 2-round, 2-client run directory as the engine writes it."""
    path.mkdir(parents=True)
    (path / "config.toml").write_text(f'method = "{method}"\nseed = {seed}\nrounds = 2\nnum_clients = 2\n'
                                      f"clients_per_round = 2\n{extra}")
    records = [
        {"round": 0, "kind": "eval", "client": 0, "rouge_l": 0.1},
        {"round": 0, "kind": "eval", "client": 1, "rouge_l": 0.3},
        {"round": 0, "kind": "server", "rouge_l_avg_base": 0.2, "knowledge_loss_base": 3.0,
         "probe_accuracy_base": 0.5, "expert_load_base": LOAD},
    ]
    for round_index in (1, 2):
        records += [{"round": round_index, "kind": "train", "client": c, "loss": 2.0, "bytes_up": 100,
                     "bytes_down": 50} for c in (0, 1)]
        server = {"round": round_index, "kind": "server", "train_loss": 2.0 / round_index, "bytes_up": 200,
                  "bytes_down": 100}
        if round_index == 2:
            records += [{"round": 2, "kind": "eval", "client": c, "rouge_l": rouge[c], "knowledge_loss": knowledge,
                         "probe_accuracy": 0.5, "expert_load_std": 0.1, "routing_drift": 0.0,
                         "expert_load": LOAD} for c in (0, 1)]
            server.update(rouge_l_avg=sum(rouge) / 2, rouge_l_global=rouge[0] / 2, knowledge_loss=knowledge,
                          probe_accuracy=0.5, expert_load_std=0.1)
        records.append(server)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "summary.json").write_text(json.dumps({"rounds_completed": 2, "wall_seconds": 10.0 + seed,
                                                   "bytes_up": 400, "bytes_down": 200}))
    (path / "clients.json").write_text(json.dumps([
        {"client_id": 0, "domains": ["animals"], "num_train": 9, "num_test": 1},
        {"client_id": 1, "domains": ["food"], "num_train": 8, "num_test": 2}]))
    return path


IDS = ["a", "b", "c", "d"]


def add_detail(run_dir: Path, personal: dict[int, list[float]], base: dict[int, list[float]],
               probes: list[int], base_probes: list[int]) -> None:
    root = run_dir / "evals"
    for cid, scores in personal.items():
        write_detail(root, 2, f"personal-client-{cid}", {"ids": IDS, "rouge_l": scores, "exact_match": [0.0] * 4})
        write_detail(root, 2, f"personal-client-{cid}-knowledge", {"probe_correct": probes, "doc_nll": [[2.0, 2]] * 3})
    for cid, scores in base.items():
        write_detail(root, 0, f"base-client-{cid}", {"ids": IDS, "rouge_l": scores, "exact_match": [0.0] * 4})
    write_detail(root, 0, "base-knowledge", {"probe_correct": base_probes, "doc_nll": [[3.0, 2]] * 3})

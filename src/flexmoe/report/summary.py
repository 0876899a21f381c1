"""The run summary (`summary.json`) and the per-evaluation means, computed from the metrics log:
one definition of every measure, for both engines and for `flexmoe report` / `flexmoe eval`."""

from __future__ import annotations

import json
import math
from pathlib import Path

from flexmoe.eval.detail import pooled_means
from flexmoe.analysis.paired import run_statistics
from flexmoe.files import write_text_atomic
from flexmoe.rundir import SUMMARY_FILE


# the per-evaluation measures a summary reports (`rouge_l_avg`: the mean of the clients' `rouge_l`)
MEASURES = ("rouge_l_avg", "test_loss", "knowledge_loss", "probe_accuracy", "expert_load_std", "routing_entropy",
            "routing_drift")
CLIENT_MEASURES = ("rouge_l_global", *MEASURES[1:])


def mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def weighted(values: list[float], weights: list[int]) -> float:
    total = sum(weights)
    return sum(v * w for v, w in zip(values, weights)) / total if total else float("nan")


def eval_means(evals: list[dict]) -> dict:
    """The server record's means over the clients' evaluation records: `rouge_l_avg` (personalised
    models), `rouge_l_global` (the global model on every client's test split) and the rest."""
    out = {"rouge_l_avg": mean([e["rouge_l"] for e in evals]), **pooled_means(evals)}
    for key in CLIENT_MEASURES:
        values = [e[key] for e in evals if key in e]
        if values:
            out[key] = mean(values)
    return out


def summarize(records: list[dict], config, wall_seconds: float | None, run_dir: Path | None = None) -> dict:
    """The summary of a run from its metrics records and its config; with `run_dir`, also the
    paired differences and CIs of its per-example files (analysis/paired.py)."""
    servers = [r for r in records if r["kind"] == "server" and r["round"] > 0]
    evaluated = [r for r in servers if "rouge_l_avg" in r]
    last_eval = evaluated[-1] if evaluated else {}
    base = next((r for r in records if r["round"] == 0 and r["kind"] == "server"), {})
    summary = {
        "method": config.method,
        "seed": config.seed,
        "rounds": config.rounds,
        "rounds_completed": servers[-1]["round"] if servers else 0,
        "num_clients": config.num_clients,
        **{key: last_eval.get(key) for key in (*MEASURES, *(f"global_{k}" for k in MEASURES if k != "test_loss"))},
        **{f"{key}_base": base.get(f"{key}_base") for key in MEASURES if key != "routing_drift"},
        "bytes_up": sum(r["bytes_up"] for r in servers),
        "bytes_down": sum(r["bytes_down"] for r in servers),
        "train_loss": servers[-1]["train_loss"] if servers else None,
        "per_client": per_client(records),
        "skipped_rows": base.get("skipped_rows", 0),  # invalid data rows left out (data.skip_invalid)
    }
    if base.get("skipped_row_errors"):
        summary["skipped_row_errors"] = base["skipped_row_errors"]
    summary.update(personal_storage(summary["per_client"]))
    if run_dir is not None:
        summary.update(run_statistics(Path(run_dir), config.seed))
    if config.privacy.noise_multiplier > 0:
        summary.update(dp_epsilon=servers[-1].get("dp_epsilon") if servers else 0.0, dp_delta=config.privacy.delta)
    if wall_seconds is not None:
        summary["wall_seconds"] = round(wall_seconds, 2)
    return summary


def personal_storage(clients: dict[str, dict]) -> dict:
    """What the clients store of their personal part, measured on their disks after their last
    round (`per_client`): `personal_bytes`, the mean over clients (absent when none stores any), and
    `personal_bytes_per_client`, the largest client's (0 when none), for sizing a deployment."""
    stored = [row["personal_bytes"] for row in clients.values() if "personal_bytes" in row]
    return {**({"personal_bytes": round(mean(stored))} if stored else {}),
            "personal_bytes_per_client": max(stored) if stored else 0}


def write_summary(run_dir: Path, summary: dict) -> None:
    write_text_atomic(Path(run_dir) / SUMMARY_FILE, json.dumps(summary, indent=2, sort_keys=True) + "\n")


def per_client(records: list[dict]) -> dict[str, dict]:
    """Per client: last ROUGE-L / knowledge loss and total bytes."""
    table: dict[str, dict] = {}
    for r in records:
        if r["kind"] == "train":
            row = table.setdefault(str(r["client"]), {"bytes_up": 0, "bytes_down": 0, "rounds_trained": 0})
            row["bytes_up"] += r["bytes_up"]
            row["bytes_down"] += r["bytes_down"]
            row["rounds_trained"] += 1
            if "personal_bytes" in r:  # after its latest round
                row["personal_bytes"] = r["personal_bytes"]
        elif r["kind"] == "eval" and r["round"] == 0:
            table.setdefault(str(r["client"]), {"bytes_up": 0, "bytes_down": 0, "rounds_trained": 0})
            table[str(r["client"])]["rouge_l_base"] = r["rouge_l"]
        elif r["kind"] == "eval":
            row = table.setdefault(str(r["client"]), {"bytes_up": 0, "bytes_down": 0, "rounds_trained": 0})
            row["rouge_l"] = r["rouge_l"]
            for key in CLIENT_MEASURES:
                if key in r:
                    row[key] = r[key]
    return table

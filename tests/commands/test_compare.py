"""`flexmoe compare` end to end on a tiny random qwen2_moe: 2 methods x 2 seeds through the
in-process engine; every method of a seed gets the same partition; the report has a row per
method over both seeds; the bytes each run measured equal the meta-device accounting; a
second invocation skips finished runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from flexmoe.commands import compare
from flexmoe.config import load_config
from flexmoe.errors import FlexmoeError
from flexmoe.cost.comm import meta_model, method_message_sizes

from helpers.engine import synthetic_examples

pytestmark = pytest.mark.usefixtures("builtin_is_synthetic")


SETTINGS = [
    "rounds=1", "num_clients=2", "clients_per_round=2", "train.local_steps=1", "train.batch_size=4",
    "train.max_length=48", "lora.r=2", "flex.calibration_examples=4", "eval.max_test_examples=2",
    "eval.max_new_tokens=3", "eval.knowledge_max_docs=2", "eval.knowledge_max_length=16", "eval.max_probes=2",
    "data.test_fraction=0.2", "eval.base=false",
]


@pytest.fixture(scope="module")
def model_dir(saved_tiny_model) -> str:
    return saved_tiny_model


def args_for(model_dir: str, out, methods: str = "flex,scaffold", seeds: str = "0,1") -> argparse.Namespace:
    return argparse.Namespace(methods=methods, seeds=seeds, config=None, quiet=True, output_dir=str(out),
                              overrides=[*SETTINGS, f'model="{model_dir}"'])


@pytest.mark.slow
def test_compare_two_methods_two_seeds(model_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert compare.run(args_for(model_dir, out)) == 0
    report = (out / "report.md").read_text()
    for method in ("flex", "scaffold"):
        assert f"| {method} | 0,1 |" in report
    assert "--methods flex,scaffold --seeds 0,1" in report
    for seed in (0, 1):  # same partition for every method of a seed
        flex = json.loads((out / "flex" / f"seed-{seed}" / "clients.json").read_text())
        assert flex == json.loads((out / "scaffold" / f"seed-{seed}" / "clients.json").read_text())
    for method in ("flex", "scaffold"):
        run_dir = out / method / "seed-0"
        config = load_config(run_dir / "config.toml")
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        fields = json.loads((Path(model_dir) / "config.json").read_text())
        model_type = fields.pop("model_type")
        for fixed in ("architectures", "transformers_version", "dtype"):
            fields.pop(fixed, None)
        train = [r for r in records if r["kind"] == "train"]
        expected = {n: method_message_sizes(config, meta_model(model_type, **fields), n)
                    for n in {r["num_examples"] for r in train}}
        assert [(r["bytes_up"], r["bytes_down"]) for r in train] == \
            [(expected[r["num_examples"]]["up"], expected[r["num_examples"]]["down"]) for r in train]
        evals = [r for r in records if r["kind"] == "eval" and r["round"] == 1]
        assert all({"probe_accuracy", "routing_drift", "test_loss", "rouge_l_global"} <= set(r) for r in evals)
    capsys.readouterr()
    mtime = (out / "flex" / "seed-0" / "summary.json").stat().st_mtime
    assert compare.run(args_for(model_dir, out)) == 0  # finished runs are skipped, the report rebuilt
    assert (out / "flex" / "seed-0" / "summary.json").stat().st_mtime == mtime


def test_bad_methods_seeds_and_settings_fail_before_any_run(model_dir, tmp_path):
    with pytest.raises(FlexmoeError, match="unknown method 'fedsgd'"):
        compare.run(args_for(model_dir, tmp_path / "a", methods="flex,fedsgd"))
    with pytest.raises(FlexmoeError, match="listed twice"):
        compare.run(args_for(model_dir, tmp_path / "a", methods="flex,flex"))
    with pytest.raises(FlexmoeError, match="--seeds"):
        compare.run(args_for(model_dir, tmp_path / "a", seeds="0,x"))
    bad = args_for(model_dir, tmp_path / "a")
    bad.overrides.append("train.lrr=1")
    with pytest.raises(FlexmoeError, match="train.lrr"):
        compare.run(bad)
    assert not (tmp_path / "a").exists()


def dolly_without_ids(path: Path) -> Path:
    """Dolly's shape (instruction, context, response, category; no id field, as databricks-dolly-15k):
    the synthetic examples with their domain as the category, and two invalid rows, lines 3 and 10."""
    rows = [json.dumps({"instruction": e.instruction, "context": "", "response": e.response, "category": e.domain})
            for e in synthetic_examples()]
    rows.insert(2, json.dumps({"instruction": "a question without an answer", "context": "", "category": "x"}))
    rows.insert(9, '{"instruction": "cut off')
    path.write_text("\n".join(rows) + "\n")
    return path


def paired_by_hand(run_dir: Path, final: int, other: str, other_round: int, other_dir: Path | None = None):
    """(pooled mean of personal − `other` over every evaluated example, examples): matched by example id."""
    def scores(folder: Path, round_index: int, model: str) -> dict:
        out = {}
        for path in sorted((folder / "evals" / f"round-{round_index}").glob(f"{model}-client-*.json")):
            client = path.stem.removeprefix(f"{model}-client-")
            if client.isdigit():  # not the client's knowledge file
                payload = json.loads(path.read_text())
                assert len(set(payload["ids"])) == len(payload["ids"]) and all(payload["ids"])
                out.update({(client, i): s for i, s in zip(payload["ids"], payload["rouge_l"])})
        return out
    mine, theirs = scores(run_dir, final, "personal"), scores(other_dir or run_dir, other_round, other)
    assert set(mine) == set(theirs)
    return sum(mine[k] - theirs[k] for k in mine) / len(mine), len(mine)


@pytest.mark.slow
def test_paired_statistics_on_dolly_data_without_ids(model_dir, tmp_path):
    """Paired statistics match every evaluated example of every client (not one per client, as when
    every example of a file without ids had the id ""), in each run's summary and report and in the
    comparison; the rows data.skip_invalid left out are counted, with their lines."""
    data = dolly_without_ids(tmp_path / "dolly.jsonl")
    out = tmp_path / "cmp"
    settings = [*SETTINGS, f'model="{model_dir}"', f'data.source="{data}"', 'data.format="dolly"',
                'data.by="category"', "data.skip_invalid=true", "num_clients=4", "clients_per_round=4",
                "eval.max_test_examples=3", "eval.base=true"]
    args = argparse.Namespace(methods="flex,fedavg", seeds="0", config=None, quiet=True, output_dir=str(out),
                              overrides=settings)
    assert compare.run(args) == 0
    flex, fedavg = out / "flex" / "seed-0", out / "fedavg" / "seed-0"
    for run_dir in (flex, fedavg):
        summary = json.loads((run_dir / "summary.json").read_text())
        diff, examples = paired_by_hand(run_dir, 1, "base", 0)
        assert examples > 4 and summary["rouge_l_vs_base"]["examples"] == examples
        assert summary["rouge_l_vs_base"]["diff"] == pytest.approx(diff, abs=1e-9)
        assert summary["skipped_rows"] == 2
        assert [e.split(": ")[0] for e in summary["skipped_row_errors"]] == [f"{data}:line 3", f"{data}:line 10"]
        report = (run_dir / "report.md").read_text()
        assert f"({examples} pairs)" in report
        assert "Invalid data rows left out (data.skip_invalid = true): 2." in report
        assert f"- {data}:line 3: missing field 'response' (response)" in report
    paired = json.loads((out / "summary.json").read_text())["paired"]
    assert paired["reference"] == "fedavg"
    diff, examples = paired_by_hand(flex, 1, "personal", 1, other_dir=fedavg)
    assert paired["methods"]["flex"]["rouge_l_vs_reference"]["examples"] == examples
    assert paired["methods"]["flex"]["rouge_l_vs_reference"]["diff"] == pytest.approx(diff, abs=1e-9)
    assert paired["methods"]["flex"]["rouge_l_vs_base"]["examples"] == examples

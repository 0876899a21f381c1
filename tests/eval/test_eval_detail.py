"""Per-example evaluation files of a real (tiny) run, the paired statistics built from them, and
which optimiser moments a client carries across rounds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flexmoe.rundir import ClientStore
from flexmoe.eval.detail import read_round
from flexmoe.files import load_checked

from helpers.engine import run

pytestmark = pytest.mark.usefixtures("builtin_is_synthetic")


EVAL = ("eval.every=1", "eval.max_test_examples=6", "eval.curve_test_examples=2", "eval.knowledge=true",
        "eval.knowledge_max_docs=6", "eval.curve_docs=3", "eval.max_probes=5", "eval.curve_probes=2",
        "eval.knowledge_max_length=32", "eval.routing=false")


@pytest.fixture(scope="module")
def flex_run(model_dir, tmp_path_factory):  # noqa: F811
    import flexmoe.data
    from helpers.engine import synthetic_examples

    out = tmp_path_factory.mktemp("detail-run")
    patch = pytest.MonkeyPatch()
    patch.setattr(flexmoe.data, "builtin_examples", synthetic_examples)
    try:
        summary = run(model_dir, out, "method=flex", "data.test_fraction=0.4", *EVAL)
    finally:
        patch.undo()
    return out, summary


@pytest.mark.slow
def test_every_model_answers_the_same_sample(flex_run):
    out, _ = flex_run
    base, final, curve = read_round(out / "evals", 0), read_round(out / "evals", 2), read_round(out / "evals", 1)
    for cid in range(4):
        ids = base[f"base-client-{cid}"]["ids"]
        assert 1 <= len(ids) <= 6
        assert final[f"personal-client-{cid}"]["ids"] == ids == final[f"global-client-{cid}"]["ids"]
        assert base[f"content-free-client-{cid}"]["ids"] == ids
        assert set(curve[f"personal-client-{cid}"]["ids"]) <= set(ids)  # the curve's sample is part of it
        assert len(curve[f"personal-client-{cid}"]["ids"]) <= 2
    # the last round scores every probe and document asked for, the curve round fewer
    assert len(final["personal-client-0-knowledge"]["probe_correct"]) == 5
    assert len(final["global-knowledge"]["doc_nll"]) == 6 == len(base["base-knowledge"]["doc_nll"])
    assert len(curve["personal-client-0-knowledge"]["probe_correct"]) == 2


@pytest.mark.slow
def test_summary_differences_are_the_files_paired(flex_run):
    out, summary = flex_run
    base, final = read_round(out / "evals", 0), read_round(out / "evals", 2)
    diffs = [p - b for cid in range(4)
             for p, b in zip(final[f"personal-client-{cid}"]["rouge_l"], base[f"base-client-{cid}"]["rouge_l"])]
    found = summary["rouge_l_vs_base"]
    assert found["examples"] == len(diffs)
    assert found["diff"] == pytest.approx(sum(diffs) / len(diffs))
    assert found["ci_low"] <= found["diff"] <= found["ci_high"]
    assert summary["probes_vs_base"]["items"] == 4 * 5
    assert summary["doc_loss_vs_base"]["examples"] == 4 * 6
    means = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    server = [r for r in means if r["kind"] == "server" and r["round"] == 2][0]
    assert "rouge_l_pooled" in server and "exact_match_avg" in server
    report = (out / "report.md").read_text()
    assert "## Paired statistics" in report and "content-free answerer" in report


def _steps(out: Path, cid: int) -> dict[str, float]:
    state = load_checked(ClientStore(out / "clients").latest(cid, "state.safetensors"))[0]
    return {key.split("::")[0]: float(value) for key, value in state.items() if key.endswith("::step")}


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["keep", "reset-shared"])
def test_optimizer_state_policy(model_dir, tmp_path, policy):  # noqa: F811
    run(model_dir, tmp_path, "method=flex", "clients_per_round=4", "eval.base=false", f"train.optimizer_state={policy}")
    steps = _steps(tmp_path, 0)
    shared = {s for name, s in steps.items() if "graft" not in name.split(".")}
    personal = {s for name, s in steps.items() if "graft" in name.split(".")}
    assert personal == {4.0}  # 2 rounds × 2 local steps: the graft's moments always persist
    assert shared == ({4.0} if policy == "keep" else {2.0})

"""Paired statistics in comparison reports: hand-written per-example files give differences,
per-seed signs and verdicts that can be checked by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.runs import write_run

from flexmoe.eval.detail import write_detail
from flexmoe.report import group_runs, read_run, write_compare_report
from flexmoe.report.comparison import best_baseline, compare_rows
from helpers.runs import add_detail


def make_runs(tmp_path: Path) -> list[Path]:
    base = {0: [0.1] * 4, 1: [0.2] * 4}
    dirs = []
    for seed, lift in ((0, 0.3), (1, 0.2)):
        flex = write_run(tmp_path / "flex" / f"seed-{seed}", "flex", seed, [0.5, 0.5], 3.0)
        add_detail(flex, {c: [v + lift for v in base[c]] for c in base}, base, [1, 1, 1, 0], [1, 0, 0, 0])
        fedavg = write_run(tmp_path / "fedavg" / f"seed-{seed}", "fedavg", seed, [0.3, 0.3], 3.0)
        add_detail(fedavg, {c: [v + 0.1 for v in base[c]] for c in base}, base, [1, 0, 0, 0], [1, 0, 0, 0])
        dirs += [flex, fedavg]
    return dirs


def test_differences_against_base_and_reference(tmp_path):
    groups = group_runs([read_run(d) for d in make_runs(tmp_path)])
    assert best_baseline(groups) == "fedavg"
    rows = compare_rows(groups, "fedavg")
    flex = rows["flex"]
    assert flex["vs_base"].diff == pytest.approx(0.25) and flex["vs_base"].examples == 16  # 2 seeds × 2 clients × 4
    assert flex["vs_base"].seed_diffs == pytest.approx({0: 0.3, 1: 0.2})
    ref = flex["vs_reference"]
    assert abs(ref.diff - 0.15) < 1e-12 and ref.ci_low > 0  # a constant lift: zero-width interval
    assert "vs_reference" not in rows["fedavg"]
    probes = flex["probes"]
    assert (probes.items, probes.only_a, probes.only_b) == (16, 8, 0)  # 2 runs × 2 clients × 4 probes
    assert abs(flex["docs"].diff - (-0.5)) < 1e-12  # per-document loss 1.0 vs 1.5


def test_compare_report_shows_the_statistics(tmp_path):
    out = tmp_path / "report"
    write_compare_report(make_runs(tmp_path), out)
    text = (out / "report.md").read_text()
    assert "## Paired statistics" in text and "Reference method: **fedavg**" in text
    section = text[text.index("## Paired statistics"):]
    flex_row = next(line for line in section.splitlines() if line.startswith("| flex |"))
    assert "+0.2500" in flex_row and "supported" in flex_row and "+ +" in flex_row
    paired = json.loads((out / "summary.json").read_text())["paired"]
    assert paired["reference"] == "fedavg"
    assert paired["methods"]["flex"]["rouge_l_vs_reference"]["verdict"] == "supported"
    assert paired["methods"]["flex"]["rouge_l_vs_base"]["examples"] == 16


def test_learning_curve_puts_every_round_on_the_curve_sample(tmp_path):
    """The last round evaluates more examples and documents than the curve rounds: its curve point
    uses only the curve round's example ids and its first documents (hand-computed means)."""
    from flexmoe.eval.detail import write_detail
    from flexmoe.analysis.paired import learning_curve
    from flexmoe.rundir import EVALS_DIR

    root = tmp_path / EVALS_DIR
    for client in (0, 1):
        write_detail(root, 0, f"base-client-{client}", {"ids": ["a", "b", "c"], "rouge_l": [0.1, 0.3, 0.9],
                                                        "exact_match": [0, 0, 0]})
        write_detail(root, 2, f"personal-client-{client}", {"ids": ["a", "b"], "rouge_l": [0.2, 0.4],
                                                            "exact_match": [0, 0]})
        write_detail(root, 2, f"personal-client-{client}-knowledge", {"doc_nll": [[4.0, 2], [2.0, 2]]})
        write_detail(root, 4, f"personal-client-{client}", {"ids": ["c", "a", "b"], "rouge_l": [1.0, 0.5, 0.7],
                                                            "exact_match": [0, 0, 0]})
        write_detail(root, 4, f"personal-client-{client}-knowledge", {"doc_nll": [[2.0, 2], [2.0, 2], [90.0, 1]]})
    write_detail(root, 0, "base-knowledge", {"doc_nll": [[6.0, 2], [6.0, 2], [0.0, 4]]})
    curve = learning_curve(tmp_path)
    assert curve[0] == pytest.approx({"rouge_l": 0.2, "knowledge_loss": 3.0})  # ids a, b; first two documents
    assert curve[2] == pytest.approx({"rouge_l": 0.3, "knowledge_loss": 1.5})
    assert curve[4] == pytest.approx({"rouge_l": 0.6, "knowledge_loss": 1.0})  # c and the third document left out
    write_detail(tmp_path / "other" / EVALS_DIR, 4, "personal-client-0", {"ids": ["a"], "rouge_l": [1.0],
                                                                          "exact_match": [0]})
    assert learning_curve(tmp_path / "other") == {}  # no curve round: nothing to compare

"""Paired statistics in comparison reports: hand-written per-example files give differences,
per-seed signs and verdicts that can be checked by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_report import write_run

from flexmoe.eval.detail import write_detail
from flexmoe.report import group_runs, read_run, write_compare_report
from flexmoe.report.stats import best_baseline, compare_rows

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

"""Reports from run directories: hand-written fixture runs give tables with hand-computed means
and spreads, plots, and `flexmoe report` rebuilds them; routing drift and ROUGE-L by hand."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from flexmoe.errors import FlexmoeError
from flexmoe.eval.measures import routing_drift
from flexmoe.report import find_runs, group_runs, read_run, run_label, write_compare_report, write_run_report
from helpers.runs import write_run


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    return [
        write_run(tmp_path / "flex" / "seed-0", "flex", 0, [0.4, 0.6], 3.1),
        write_run(tmp_path / "flex" / "seed-1", "flex", 1, [0.2, 0.4], 3.3),
        write_run(tmp_path / "fedavg" / "seed-0", "fedavg", 0, [0.1, 0.1], 3.5),
        write_run(tmp_path / "nogate" / "seed-0", "flex", 0, [0.0, 0.0], 4.0, '[flex]\ngate = "none"\n'),
    ]


def test_run_report_shows_clients_retention_rounds_and_plots(runs):
    report = write_run_report(runs[0]).read_text()
    assert "| 0 | animals | 9 | 1 | 0.1000 | 0.4000 |" in report  # base ROUGE-L beside the trained one
    assert "| **mean** |  |  |  | 0.2000 | 0.5000 |" in report
    assert "base 3.0000 → personalised models 3.1000" in report
    assert "| 2 | 1.0000 | 0.5000 | 3.1000 | 200 | 100 | 600 |" in report  # cumulative bytes 300 + 300
    for name in ("rounds.png", "bytes.png", "expert_load.png"):
        assert (runs[0] / "plots" / name).read_bytes()[:4] == b"\x89PNG"


def test_compare_report_means_and_spreads_over_seeds(runs, tmp_path):
    out = tmp_path / "cmp"
    text = write_compare_report(runs, out, command="flexmoe compare --methods flex,fedavg").read_text()
    # flex: run means 0.5 and 0.3 -> mean 0.4, sample std 0.1414; client 0: 0.4, 0.2 -> 0.3 ± 0.1414
    row = next(line for line in text.splitlines() if line.startswith("| flex | 0,1 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:5] == ["0.4000 ± 0.1414", "0.3000 ± 0.1414", "0.5000 ± 0.1414"]
    assert cells[5] == "0.1500 ± 0.0707"  # the global model: 0.4 / 2 and 0.2 / 2
    assert cells[6:8] == ["3.2000 ± 0.1414", "+0.2000 ± 0.1414"]  # knowledge loss and its rise over the base
    assert cells[9] == "300" and cells[10] == "10.5 ± 0.7"  # bytes per round (200 up + 100 down); wall s
    assert "| fedavg | 0 | 0.1000 |" in text and "| flex-nogate | 0 | 0.0000 |" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["flex"]["rouge_l_avg"]["mean"] == pytest.approx(0.4)
    assert summary["flex"]["bytes_per_round"] == 300
    for name in ("rouge_l.png", "train_loss.png", "bytes.png", "expert_load-flex-nogate.png"):
        assert (out / "plots" / name).is_file()


def test_labels_name_variants_and_duplicate_seeds_are_refused(runs, tmp_path):
    assert run_label({"method": "flex", "flex": {"k": 3}}) == "flex-k3"
    assert run_label({"method": "fedavg", "lora": {"scope": "full"}}) == "fedavg+full"
    twin = write_run(tmp_path / "again", "fedavg", 0, [0.1, 0.1], 3.5)
    with pytest.raises(FlexmoeError, match="fedavg seed 0 appears twice"):
        group_runs([read_run(p) for p in [runs[2], twin]])


def test_report_command_rebuilds_a_run_and_a_comparison(runs, tmp_path):
    from flexmoe.commands import report as command

    (runs[0] / "report.md").unlink(missing_ok=True)
    assert command.run(argparse.Namespace(dirs=[str(runs[0])], output_dir=None)) == 0
    assert (runs[0] / "report.md").is_file()
    assert command.run(argparse.Namespace(dirs=[str(tmp_path)], output_dir=None)) == 0
    assert "| fedavg | 0 |" in (tmp_path / "report.md").read_text()
    assert len(find_runs([tmp_path])) == 4
    with pytest.raises(FlexmoeError, match="no run directory"):
        find_runs([tmp_path / "flex" / "seed-0" / "plots"])
    with pytest.raises(FlexmoeError, match="--output-dir"):
        command.run(argparse.Namespace(dirs=[str(runs[0]), str(runs[1])], output_dir=None))


def test_a_corrupt_metrics_line_names_the_file_and_line(runs):
    path = runs[0] / "metrics.jsonl"
    path.write_text('{"round": 0, "kind": "server"}\n[1, 2]\n')
    with pytest.raises(FlexmoeError, match=r"metrics.jsonl:2"):
        read_run(runs[0])


def test_routing_drift_is_the_total_variation_distance():
    base = {"a": [0.5, 0.5, 0.0], "b": [1.0, 0.0, 0.0]}
    moved = {"a": [0.5, 0.25, 0.25], "b": [0.0, 0.0, 1.0]}
    # layer a: 1/2 (0 + 0.25 + 0.25) = 0.25; layer b: disjoint = 1
    assert routing_drift(moved, base) == pytest.approx((0.25 + 1.0) / 2)
    assert routing_drift(base, base) == 0.0


def test_rouge_l_equals_rouge_score_on_fixtures():
    from rouge_score import rouge_scorer

    from flexmoe.eval.rouge import rouge_l

    pairs = [("a cat is an animal", "the cat was an animal"), ("running fast", "runs quickly and fast"),
             ("", "something"), ("Hello, World!", "hello world")]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in pairs]
    assert rouge_l([p for p, _ in pairs], [r for _, r in pairs]) == expected
    assert expected[1] == pytest.approx(2 * (2 / 2) * (2 / 4) / (2 / 2 + 2 / 4))  # run/fast stem-match


def _study_run(root, method, seed, rouge, docs, probes, conflicts=()):
    """A finished run directory holding only what the study reads: per-example answers and
    knowledge of two clients at round 2, a summary, and FC-MoE's conflict fractions."""
    from flexmoe.eval.detail import write_detail
    from flexmoe.rundir import EVALS_DIR

    run = root / method / f"seed-{seed}"
    for client in (0, 1):
        write_detail(run / EVALS_DIR, 2, f"personal-client-{client}",
                     {"ids": ["a", "b"], "rouge_l": rouge[client], "exact_match": [0.0, 1.0]})
        write_detail(run / EVALS_DIR, 2, f"personal-client-{client}-knowledge",
                     {"doc_nll": [[d * 2, 2] for d in docs], "probe_correct": probes})
    (run / "summary.json").write_text(json.dumps({"rounds": 2, "rounds_completed": 2, "wall_seconds": 1.0}))
    records = [{"round": r + 1, "kind": "server", "fcmoe_conflict_fraction": f} for r, f in enumerate(conflicts)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [{"kind": "client"}, *records]))


def test_fidelity_claims_are_paired_differences_with_a_verdict(tmp_path):
    from benchmarks.bench_fidelity import claim_stats, conflict_stats, study_section

    for seed in (1, 2):  # flex is 0.1 better on every example; its held-out loss 0.5 higher per document
        _study_run(tmp_path, "flex", seed, [[0.5, 0.7], [0.3, 0.4]], [2.5, 3.5], [1, 1, 0, 0])
        _study_run(tmp_path, "fedavg", seed, [[0.4, 0.6], [0.2, 0.3]], [2.0, 3.0], [1, 0, 0, 0])
        _study_run(tmp_path, "fcmoe", seed, [[0.4, 0.6], [0.2, 0.3]], [2.0, 3.0], [1, 0, 0, 0],
                   conflicts=(0.0, 0.5) if seed == 1 else (0.25,))
    runs = {m: {s: tmp_path / m / f"seed-{s}" for s in (1, 2)} for m in ("flex", "fedavg", "fcmoe")}
    rouge, exact, (probes, docs) = claim_stats(runs["flex"], runs["fedavg"], [1, 2])
    assert rouge.diff == pytest.approx(0.1) and rouge.examples == 8
    assert exact.diff == 0 and docs.diff == pytest.approx(0.5)
    assert (probes.items, probes.only_a, probes.only_b) == (16, 4, 0)
    lines = study_section(tmp_path, "persona", ("flex", "fedavg", "fcmoe"), (1, 2))
    row = next(line for line in lines if "(flex vs fedavg)" in line)
    cells = [c.strip() for c in row.split("|")]
    assert cells[2].startswith("+0.1000") and cells[3] == "+ +" and cells[4] == "supported"
    assert cells[6].startswith("+0.5000") and cells[7] == "contradicted"  # flex lost more knowledge
    assert conflict_stats({"fcmoe": list(runs["fcmoe"].values())}) == {
        "fcmoe": {"fcmoe_conflict_fraction": pytest.approx(0.25)}}  # mean over the rounds of both seeds
    assert any("fcmoe: 25.0% of the" in line for line in lines)


def test_run_report_counts_failures_rejections_and_states_the_privacy_spent(runs):
    run_dir = runs[0]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    servers = [r for r in records if r["kind"] == "server" and r["round"] > 0]
    servers[0].update(failed=[1], rejected=[{"client": 0, "reason": "NaN"}, {"client": 1, "reason": "norm"}])
    servers[1].update(failed=[0])
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**summary, "dp_epsilon": 12.3, "dp_delta": 1e-5}))
    with (run_dir / "config.toml").open("a") as f:
        f.write("[privacy]\nnoise_multiplier = 1.0\nclip_norm = 0.5\n")
    report = write_run_report(run_dir).read_text()
    assert "Client failures skipped: 2; updates rejected by the server's validation: 2" in report
    assert "noise multiplier 1.0, clip norm 0.5; (ε, δ) = (12.3, 1e-05) after 2 rounds" in report
    assert "Failures, rejections" not in write_run_report(runs[1]).read_text()  # nothing to say


def test_report_names_the_clients_categories_and_counts_truncation(tmp_path):
    run = write_run(tmp_path / "by-category", "flex", 0, [0.4, 0.6], 3.1, '[data]\nby = "category"\n\n[train]\n'
                    "max_length = 64\n")
    (run / "clients.json").write_text(json.dumps([
        {"client_id": 0, "domains": ["animals"], "categories": ["open_qa", "summarization"], "num_train": 9,
         "num_test": 1, "truncated": 3, "unusable": 0},
        {"client_id": 1, "domains": ["food"], "categories": [], "num_train": 8, "num_test": 2}]))
    report = write_run_report(run).read_text()
    assert "| client | categories | train |" in report
    assert "| 0 | open_qa, summarization | 9 |" in report and "| 1 | - | 8 |" in report
    assert "train.max_length = 64 tokens: 3 of 17 were cut" in report and "client 0: 3" in report
    assert "![per-client learning curves" in report and (run / "plots" / "clients.png").is_file()


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions save, by file name, instead of PNG files."""
    from flexmoe.report import plots

    saved = {}

    def keep(fig, path):
        saved[path.name] = fig
        return path.name

    monkeypatch.setattr(plots, "_save", keep)
    return saved


def test_run_plots_integer_rounds_base_as_round_zero_and_both_directions(runs, figures):
    from flexmoe.report import plots

    run = read_run(runs[0])
    plots.run_rounds(run, runs[0] / "rounds.png")
    plots.run_bytes(run, runs[0] / "bytes.png")
    plots.run_clients(run, runs[0] / "clients.png")
    _, rouge, knowledge = figures["rounds.png"].axes
    for ax in figures["rounds.png"].axes + figures["bytes.png"].axes + figures["clients.png"].axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)  # no round 1.5
        assert ax.get_xlim()[0] < 0.5 and ax.get_xlim()[1] > 1.5  # the run's whole span, round 0 included
    # one evaluated round still draws a line: the base (round 0) to round 2, and the base as a reference
    curve, reference = rouge.lines
    assert list(curve.get_xdata()) == [0, 2] and list(curve.get_ydata()) == [0.2, 0.5]
    assert list(reference.get_ydata()) == [0.2, 0.2]
    assert list(knowledge.lines[0].get_ydata()) == [3.0, 3.1]
    assert not knowledge.yaxis.get_major_formatter().get_useOffset()
    per_round, cumulative = figures["bytes.png"].axes
    assert [len(bars) for bars in per_round.containers] == [2, 2]  # up and down, side by side per round
    up, down = cumulative.lines
    assert up.get_linestyle() != down.get_linestyle() and up.get_marker() != down.get_marker()
    assert list(up.get_ydata()) == [0.0002, 0.0004] and list(down.get_ydata()) == [0.0001, 0.0002]
    train, scores = figures["clients.png"].axes
    assert [line.get_label() for line in train.lines] == ["client 0", "client 1"]
    assert [list(line.get_ydata()) for line in scores.lines] == [[0.1, 0.4], [0.3, 0.6]]


def test_compare_plot_starts_at_the_base_with_a_reference_line(runs, figures):
    from flexmoe.report import plots

    groups = group_runs([read_run(path) for path in runs[:3]])
    plots.compare_rounds(groups, "knowledge_loss", "held-out knowledge loss", runs[0] / "knowledge.png")
    ax = figures["knowledge.png"].axes[0]
    assert not ax.yaxis.get_major_formatter().get_useOffset()
    reference = [line for line in ax.lines if line.get_linestyle() == ":"]
    assert len(reference) == 1 and list(reference[0].get_ydata()) == [3.0, 3.0]
    flex_curve = next(bars for bars in ax.containers if bars.get_label() == "flex").lines[0]
    assert list(flex_curve.get_xdata()) == [0, 2] and list(flex_curve.get_ydata()) == pytest.approx([3.0, 3.2])


def test_run_report_shows_each_clients_grafted_expert_beside_the_median_and_worst(runs):
    for client, (expert, loss) in enumerate([(3, 0.5), (5, 0.25)]):
        folder = runs[0] / "clients" / str(client)
        folder.mkdir(parents=True, exist_ok=True)
        layers = {"model.layers.0.mlp": {"experts": [expert], "loss": loss, "median_loss": 1.0, "worst_loss": 2.0},
                  "model.layers.1.mlp": {"experts": [1], "loss": 0.75, "median_loss": 0.8, "worst_loss": 0.9}}
        (folder / "selection.json").write_text(json.dumps({"strategy": "reconstruction", "k": 1, "layers": layers}))
    report = write_run_report(runs[0]).read_text()
    assert "## Grafted experts" in report
    assert "| 0 | e3 (0.5000 / 1.0000 / 2.0000) | e5 (0.2500 / 1.0000 / 2.0000) | 2 |" in report
    assert "| 1 | e1 (0.7500 / 0.8000 / 0.9000) | e1 (0.7500 / 0.8000 / 0.9000) | 1 |" in report

"""Reports that cannot mislead: exact match first where the content-free answerer out-scores every
trained model on ROUGE-L, a shared federated baseline as the default reference (never a personal
control), test splits smaller than the sample named, and the personal state a client stores."""

from __future__ import annotations

import json
from pathlib import Path

from helpers.runs import write_run
from helpers.runs import add_detail

from flexmoe.report import group_runs, read_run, write_compare_report, write_run_report
from flexmoe.report.comparison import best_baseline
from flexmoe.report.summary import summarize
from flexmoe.report.tables import small_test_lines


def with_content_free(run_dir: Path, rouge: float, exact: float = 0.0) -> Path:
    """Give the run's round-0 record the content-free answerer's means, and exact match to the last round."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        if record["kind"] == "server" and record["round"] == 0:
            record.update(rouge_l_avg_content_free=rouge, exact_match_avg_content_free=exact)
        if record["kind"] == "server" and record["round"] == 2:
            record["exact_match_avg"] = 0.45 if "flex" in str(run_dir) else 0.25
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def runs(tmp_path: Path, content_free: float) -> list[Path]:
    base = {0: [0.1] * 4, 1: [0.2] * 4}
    dirs = []
    # fedper and local score highest on ROUGE-L: a personal control must still not be the reference
    for method, rouge, lift in (("flex", 0.5, 0.3), ("fedavg", 0.3, 0.1), ("fedprox", 0.2, 0.05),
                                ("fedper", 0.6, 0.35), ("local", 0.7, 0.4)):
        for seed in (0, 1):
            run = write_run(tmp_path / method / f"seed-{seed}", method, seed, [rouge, rouge], 3.0)
            add_detail(run, {c: [v + lift for v in base[c]] for c in base}, base, [1, 0, 0, 0], [1, 0, 0, 0])
            dirs.append(with_content_free(run, content_free))
    return dirs


def test_the_default_reference_is_the_best_shared_federated_baseline(tmp_path):
    groups = group_runs([read_run(d) for d in runs(tmp_path, content_free=0.1)])
    assert best_baseline(groups) == "fedavg"  # fedper 0.6 and local 0.7 score higher, but are personal controls
    out = tmp_path / "report"
    write_compare_report(runs(tmp_path / "again", 0.1), out)
    assert "Reference method: **fedavg**" in (out / "report.md").read_text()
    assert json.loads((out / "summary.json").read_text())["paired"]["reference"] == "fedavg"
    controls_only = {label: group for label, group in groups.items() if label in ("flex", "fedper", "local")}
    assert best_baseline(controls_only) is None  # no shared baseline: no reference rather than a wrong one


def test_a_content_free_answerer_above_every_model_makes_the_report_lead_with_exact_match(tmp_path):
    out = tmp_path / "report"
    write_compare_report(runs(tmp_path / "runs", content_free=0.75), out)  # above local's 0.7, the best
    text = (out / "report.md").read_text()
    assert text.splitlines()[2].startswith("**Read exact match first.**")
    assert "(0.7500) than every trained model (best: local, 0.7000)" in text
    header = next(line for line in text.splitlines() if line.startswith("| method | seeds |"))
    assert header.index("mean exact match") < header.index("mean ROUGE-L")
    flex_row = next(line for line in text.splitlines() if line.startswith("| flex | 0,1 |"))
    assert flex_row.split("|")[3].strip() == "0.4500 ± 0.0000"  # exact match leads the row
    paired = json.loads((out / "summary.json").read_text())["paired"]
    assert paired["lead_metric"] == "exact_match"
    section = text[text.index("## Paired statistics"):]
    assert "| method | exact match − base [95% CI] |" in section and "decided on exact match" in section
    # below the best model: ROUGE-L leads as before
    calm = tmp_path / "calm"
    write_compare_report(runs(tmp_path / "runs2", content_free=0.65), calm)
    text = (calm / "report.md").read_text()
    assert "Read exact match first" not in text
    assert json.loads((calm / "summary.json").read_text())["paired"]["lead_metric"] == "rouge_l"


def test_a_single_run_report_leads_with_exact_match_too(tmp_path):
    run = with_content_free(write_run(tmp_path / "flex" / "seed-0", "flex", 0, [0.3, 0.3], 3.0), 0.4)
    assert write_run_report(run).read_text().splitlines()[2].startswith("**Read exact match first.**")
    other = with_content_free(write_run(tmp_path / "flex2" / "seed-0", "flex", 0, [0.3, 0.3], 3.0), 0.2)
    assert "Read exact match first" not in write_run_report(other).read_text()


def test_small_test_splits_are_named(tmp_path):
    # write_run's clients hold 1 and 2 test examples; with a sample of 2, client 0 is below it
    run = write_run(tmp_path / "flex" / "seed-0", "flex", 0, [0.3, 0.3], 3.0, "[eval]\nmax_test_examples = 2\n")
    assert small_test_lines([read_run(run)]) == [
        "Test splits smaller than the evaluation sample (eval.max_test_examples = 2), evaluated on all of their "
        "examples instead (in brackets): client 0 (1). Their means rest on fewer examples."]
    assert "client 0 (1)" in write_run_report(run).read_text()
    big = write_run(tmp_path / "flex" / "seed-1", "flex", 1, [0.3, 0.3], 3.0, "[eval]\nmax_test_examples = 1\n")
    assert small_test_lines([read_run(big)]) == []
    two = [write_run(tmp_path / "fedavg" / f"seed-{s}", "fedavg", s, [0.3, 0.3], 3.0) for s in (0, 1)]
    lines = small_test_lines([read_run(d) for d in two])  # the default sample, 128: both clients, both seeds
    assert "seed 0: client 0 (1), client 1 (2); seed 1: client 0 (1), client 1 (2)" in lines[0]


def test_summary_and_report_carry_the_stored_personal_bytes(tmp_path):
    run = write_run(tmp_path / "flex" / "seed-0", "flex", 0, [0.3, 0.3], 3.0, '[flex]\ngraft_train = "lora"\n')
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        if record["kind"] == "train":  # round 2 overrides round 1: the latest is what is stored
            record["personal_bytes"] = 1000 * record["round"] + 10 * record["client"]
    summary = summarize(records, _Config(), None)
    assert summary["per_client"]["0"]["personal_bytes"] == 2000 and summary["per_client"]["1"]["personal_bytes"] == 2010
    assert summary["personal_bytes"] == 2005
    (run / "summary.json").write_text(json.dumps({**summary, "wall_seconds": 1.0}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = write_run_report(run).read_text()
    assert "Personal state stored per client: 2,000 to 2,010 bytes (the graft's LoRA, gate and selection" in text
    out = tmp_path / "compare"
    write_compare_report([run], out)
    assert "personal bytes / client" in (out / "report.md").read_text()
    assert json.loads((out / "summary.json").read_text())["flex"]["personal_bytes"] == 2005  # LoRA: the default


class _Config:
    method, seed, rounds, num_clients = "flex", 0, 2, 2

    class privacy:
        noise_multiplier = 0.0


def test_labels_name_the_graft_training_and_a_personal_learning_rate_off_their_defaults():
    from flexmoe.commands.compare import VARIANTS
    from flexmoe.report import run_label

    assert run_label({"method": "flex", "flex": {"graft_train": "lora"}}) == "flex"  # the default
    assert run_label({"method": "flex", "flex": {"graft_train": "full"}}) == "flex-full"
    assert run_label({"method": "flex", "flex": {"graft_train": "full", "graft_init": "zero"}}) == "flex-zero"
    assert run_label({"method": "fedper", "train": {"personal_lr": 1e-4}}) == "fedper-plr0.0001"
    assert run_label({"method": "fedper", "train": {"personal_lr": 0.0}}) == "fedper"  # fedper's default: lr
    # FLEx's default personal rate is 4e-5: named only when another one is set (0: the shared lr)
    assert run_label({"method": "flex", "train": {"personal_lr": 4e-5}}) == "flex"
    assert run_label({"method": "flex", "train": {"personal_lr": 0.0}}) == "flex-plr=lr"
    assert run_label({"method": "flex+fcmoe", "train": {"personal_lr": 1e-3}}) == "flex+fcmoe-plr0.001"
    assert VARIANTS["flex-full"] == ("flex", ("flex.graft_train=full",))


def test_fcmoe_ablations_have_labels_of_their_own():
    from flexmoe.report import run_label

    assert run_label({"method": "fcmoe", "fcmoe": {"project": True, "retention": 0.5}}) == "fcmoe"
    assert run_label({"method": "fcmoe", "fcmoe": {"project": False}}) == "fcmoe-project=false"
    assert run_label({"method": "fcmoe", "fcmoe": {"retention": 0.0}}) == "fcmoe-retention=0"
    assert (run_label({"method": "fcmoe", "fcmoe": {"frequency_power": 0.0, "norm_power": 0.0}})
            == "fcmoe-frequency_power=0-norm_power=0")
    assert run_label({"method": "fcmoe", "fcmoe": {"groups": "tensor"}}) == "fcmoe-groups=tensor"

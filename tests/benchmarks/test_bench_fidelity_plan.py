"""The fidelity study's plan and its summary tables (benchmarks/bench_fidelity.py), without real runs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

import benchmarks
from benchmarks import bench_fidelity as fidelity
from flexmoe.config import load_config, parse_override, valid_keys

REPO = Path(benchmarks.__file__).resolve().parent.parent  # the settings' config files are relative to it


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def test_the_plan_lists_every_variant_of_both_settings_over_three_seeds(tmp_path):
    assert len(fidelity.VARIANTS) == 26 and fidelity.SEEDS == (1, 2, 3) and not fidelity.PENDING_KEYS
    runs, blocked = fidelity.plan_runs(fidelity.chosen_methods(""), fidelity.SEEDS, [], tmp_path)
    assert len(runs) == 26 * 2 * 3 and blocked == {}  # by hand: 26 variants × 2 settings × 3 seeds
    for setting in fidelity.SETTINGS:
        for variant in fidelity.VARIANTS:
            seeds = sorted(r.seed for r in runs if r.setting == setting and r.variant == variant)
            assert seeds == [1, 2, 3], (setting, variant)
    assert not [r for r in runs if r.alias_of]  # every variant differs from every other: 156 runs to make
    assert len({r.run_dir for r in runs}) == len(runs)
    assert all(r.status == "to run" and r.run_dir.is_relative_to(tmp_path / r.setting) for r in runs)
    first = runs[0]
    assert first.command()[:4] == ["flexmoe", "run", "--quiet", "--config"] and f"seed={first.seed}" in first.command()


def test_a_variant_with_an_earlier_ones_config_is_read_from_it(tmp_path, monkeypatch):
    monkeypatch.setitem(fidelity.VARIANTS, "flex-lora", ("flex", ("flex.graft_train=lora",)))  # the default
    runs, _ = fidelity.plan_runs({"persona": ("flex", "flex-lora", "flex-full")}, (1, 2), [], tmp_path)
    aliases = {(r.variant, r.seed): r.alias_of for r in runs if r.alias_of}
    assert aliases == {("flex-lora", 1): "flex", ("flex-lora", 2): "flex"}
    assert all(r.run_dir == tmp_path / "persona" / "flex" / f"seed-{r.seed}" for r in runs if r.alias_of)


def test_a_variant_needing_a_missing_key_is_listed_as_not_runnable(tmp_path, monkeypatch):
    monkeypatch.setitem(fidelity.VARIANTS, "flex-new", ("flex", ("flex.no_such_key=1",)))
    monkeypatch.setitem(fidelity.PENDING_KEYS, "flex.no_such_key", "needs a key flex.no_such_key")
    runs, blocked = fidelity.plan_runs({"persona": ("flex", "flex-new")}, (1,), [], tmp_path)
    assert [r.variant for r in runs] == ["flex"] and blocked == {"persona": {"flex-new": ["flex.no_such_key"]}}


def test_every_claim_names_planned_variants_and_every_row_is_covered():
    pairs = [(a, b) for a, b, _ in (*fidelity.CLAIMS, *fidelity.LOAD_CLAIMS)]
    assert all(a in fidelity.VARIANTS and b in fidelity.VARIANTS for a, b in pairs)
    assert all(v in fidelity.VARIANTS for v, _ in fidelity.K_VARIANTS)
    letters = {letter for _, _, claim in (*fidelity.CLAIMS, *fidelity.LOAD_CLAIMS)
               for group in re.findall(r"^\(([a-j, ]+)\)", claim) for letter in group.replace(" ", "").split(",")}
    assert letters == set("abcdefghj")  # (i) is the routing and bytes table
    for baseline in ("fedavg", "fedprox", "scaffold", "fedadam"):  # the paper's table, both scopes
        assert ("flex", baseline) in pairs and ("flex", f"{baseline}+experts") in pairs


def test_each_variants_overrides_are_config_keys_that_land():
    for name, (method, overrides) in fidelity.VARIANTS.items():
        missing = fidelity.missing_keys(name)
        if missing:
            assert set(missing) <= set(fidelity.PENDING_KEYS), name
            continue
        config = load_config(None, [f"method={method}", *overrides])
        assert config.method == method
        for item in overrides:
            key, value = parse_override(item)
            found = config
            for part in key.split("."):
                found = getattr(found, part)
            assert found == value, (name, key)


def test_plan_mode_prints_the_runs_and_an_estimate_and_writes_nothing(tmp_path, monkeypatch, capsys):
    root, results = tmp_path / "root", tmp_path / "results"
    finished = root / "persona" / "flex" / "seed-1"
    finished.mkdir(parents=True)
    (finished / "summary.json").write_text(json.dumps({"rounds": 5, "rounds_completed": 5, "wall_seconds": 600.0}))
    monkeypatch.setenv("FLEXMOE_FIDELITY_PLAN", "1")
    monkeypatch.setenv("FLEXMOE_FIDELITY_ROOT", str(root))
    monkeypatch.setitem(fidelity.VARIANTS, "flex-lora", ("flex", ("flex.graft_train=lora",)))  # = flex
    monkeypatch.setenv("FLEXMOE_FIDELITY_METHODS", "persona=flex,flex-lora,fedavg")
    monkeypatch.setenv("FLEXMOE_BENCH_JOBS", "2")
    monkeypatch.setattr(fidelity.subprocess, "run", lambda *a, **k: pytest.fail("the plan started a run"))
    before = sorted(p for p in tmp_path.rglob("*"))
    fidelity.main(results)
    assert sorted(p for p in tmp_path.rglob("*")) == before
    out = capsys.readouterr().out
    assert "persona/flex/seed-1: finished" in out and "persona/fedavg/seed-3: to run" in out
    assert "persona/flex-lora/seed-2: same config as flex" in out
    assert "runs: 6 to make (1 finished, 0 partial, 5 not started); 3 (setting, variant, seed) read from" in out
    # 5 unfinished runs × the 600 s of the one finished run = 50 CPU minutes, 25 at 2 jobs
    assert "estimate: 50 CPU minutes" in out and "about 25 minutes of wall time at 2 job(s)" in out


# ---- the d / e / i tables from hand-written run directories ---------------------------------------
def _fake_run(root: Path, variant: str, seed: int, clients: dict, personal: int, wall: float,
              steps: int = 30, training: float | None = None, base_std: float = 0.1) -> Path:
    run = root / variant / f"seed-{seed}"
    run.mkdir(parents=True)
    summary = {"rounds": 5, "rounds_completed": 5, "wall_seconds": wall, "bytes_up": 5000, "bytes_down": 10000,
               "personal_bytes": personal, "expert_load_std_base": base_std, "routing_entropy_base": 1.5,
               "per_client": {str(c): row for c, row in clients.items()}}
    (run / "summary.json").write_text(json.dumps(summary))
    train = [{"kind": "train", "round": r, "client": c, "steps": steps} for r in range(1, 6) for c in clients]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [{"kind": "server", "round": 0}, *train]))
    if training is not None:
        (root / variant / f"seed-{seed}.log").write_text(
            "# command: flexmoe run ...\nwhat matters: ...\n"
            f"time: setup and round 0 20 s, training {training:.0f} s, evaluation 90 s, report 1 s; 300 s in all\n")
    return run


def _client(rouge, base, std, drift, entropy):
    return {"rouge_l": rouge, "rouge_l_base": base, "expert_load_std": std, "routing_drift": drift,
            "routing_entropy": entropy}


@pytest.fixture
def fake_runs(tmp_path):
    root = tmp_path / "persona"
    for seed in (1, 2):
        _fake_run(root, "flex", seed, {0: _client(0.4, 0.1, 0.09, 0.02, 1.6), 1: _client(0.6, 0.1, 0.11, 0.04, 1.8)},
                  personal=1000, wall=400.0, training=240.0 if seed == 1 else None)
        _fake_run(root, "flex-k2", seed, {0: _client(0.5, 0.1, 0.10, 0.03, 1.7), 1: _client(0.7, 0.1, 0.12, 0.05, 1.9)},
                  personal=2000, wall=600.0)
        _fake_run(root, "fedavg", seed, {0: _client(0.2, 0.1, 0.10, 0.01, 1.5), 1: _client(0.2, 0.1, 0.13, 0.01, 1.5)},
                  personal=0, wall=300.0)
    return root


def test_the_k_table_means_costs_and_step_times(fake_runs):
    runs = fidelity._variant_runs(fake_runs, ("flex", "flex-k2", "flex-k3", "fedavg"), (1, 2), None)
    rows = {r["k"]: r for r in fidelity.k_rows(runs)}
    assert set(rows) == {1, 2}  # no flex-k3 run
    assert rows[1]["rouge_l"][0] == pytest.approx(0.5) and rows[2]["rouge_l"][0] == pytest.approx(0.6)
    assert rows[1]["gain"][0] == pytest.approx(0.4) and rows[2]["gain"][0] == pytest.approx(0.5)
    low, high = rows[1]["rouge_l"][1:]
    assert 0.4 <= low < 0.5 < high <= 0.6  # the CI spans the clients
    assert rows[1]["bytes_per_round"] == pytest.approx(3000) and rows[2]["personal_bytes"] == pytest.approx(2000)
    # 2 clients × 5 rounds × 30 steps = 300 steps: seed 1's log says 240 s of training, seed 2 has no log (400 s wall)
    assert rows[1]["step_seconds"] == pytest.approx((240 / 300 + 400 / 300) / 2) and not rows[1]["step_exact"]
    assert fidelity.step_seconds(fake_runs / "flex" / "seed-1") == (pytest.approx(0.8), True)
    assert rows[2]["step_seconds"] == pytest.approx(2.0) and rows[2]["vs_k1"] is None  # no per-example files
    table = fidelity.k_table(list(rows.values()))
    assert any(line.startswith("| 2 | flex-k2 | 1,2 | 0.6000 [") and "| 3,000 | 2,000 | ≈ 2.000 |" in line
               for line in table)


def test_the_load_and_routing_tables_and_the_paired_load_row(fake_runs):
    runs = fidelity._variant_runs(fake_runs, ("flex", "flex-full", "fedavg"), (1, 2), {"flex-full": "flex"})
    assert runs["flex-full"] == runs["flex"]  # an alias reads the run it shares
    load = {r["variant"]: r for r in fidelity.load_rows(runs)}
    assert load["flex"]["load_std"][0] == pytest.approx(0.10) and load["fedavg"]["load_std"][0] == pytest.approx(0.115)
    assert load["flex"]["base"] == pytest.approx(0.1)
    routing = {r["variant"]: r for r in fidelity.routing_rows(runs)}
    assert routing["flex"]["drift"][0] == pytest.approx(0.03) and routing["flex"]["entropy"][0] == pytest.approx(1.7)
    assert routing["fedavg"]["bytes_up"] == pytest.approx(1000) and routing["fedavg"]["bytes_down"] == pytest.approx(2000)
    found = fidelity.client_difference(runs["flex"], runs["fedavg"], [1, 2], "expert_load_std")
    assert found.diff == pytest.approx(-0.015) and found.examples == 4 and found.seed_diffs == {
        1: pytest.approx(-0.015), 2: pytest.approx(-0.015)}
    lines = fidelity.study_section(fake_runs, "persona", ("flex", "flex-full", "fedavg"), (1, 2), {"flex-full": "flex"})
    row = next(line for line in lines if "(flex vs fedavg)" in line and "expert load" in line)
    assert row.split("|")[2].strip().startswith("-0.01500") and "− −" in row
    assert "### (d) k grafted experts per layer: what a larger k buys and costs" in lines
    assert any(line.startswith("| fedavg | 1,2 | 0.11500 [") for line in lines)  # (e)
    assert any(line.startswith("| flex | 1,2 | 0.0300 [") and "| 1.7000 [" in line for line in lines)  # (i)


def test_report_only_writes_the_result_with_variants_tables_and_what_is_not_runnable(fake_runs, tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXMOE_FIDELITY_REPORT_ONLY", "1")
    monkeypatch.setenv("FLEXMOE_FIDELITY_ROOT", str(fake_runs.parent))
    monkeypatch.setenv("FLEXMOE_FIDELITY_METHODS", "persona=flex,flex-k2,fedavg")
    monkeypatch.setenv("FLEXMOE_FIDELITY_SEEDS", "1,2")
    monkeypatch.setattr(fidelity.subprocess, "run", lambda *a, **k: pytest.fail("report-only started a run"))
    monkeypatch.setattr(fidelity, "report_finished", lambda root, runs: {})  # the compare report: tested elsewhere
    monkeypatch.setattr(fidelity, "header_markdown", lambda title, command: f"# {title}\n\nCommand: `{command}`\n")
    monkeypatch.setattr(fidelity, "_commit", lambda: "0123456789abcdef")
    fidelity.main(tmp_path / "results")
    text = next((tmp_path / "results").glob("fidelity-*.md")).read_text()
    assert (f"computed from the archived results of 6 finished runs in `{tmp_path / 'results' / 'fidelity-runs'}` "
            "(made at commit 0123456789)") in text
    assert "**Reduced study.** persona: flex, flex-k2, fedavg; seeds 1, 2" in text
    assert "| flex-k3 | flex | `flex.k=3` | not run |" in text and "| flex-k2 | flex | `flex.k=2` | own |" in text
    assert "### (d) k grafted experts" in text and "### (e) expert load" in text and "### (i) routing" in text


def test_a_finished_run_is_archived_without_its_checkpoints_and_read_from_the_archive(fake_runs, tmp_path, monkeypatch):
    run_dir = fake_runs / "flex" / "seed-1"
    (run_dir / "config.toml").write_text('method = "flex"\n')
    (run_dir / "evals" / "round-5").mkdir(parents=True)
    (run_dir / "evals" / "round-5" / "personal-client-0.json").write_text("{}")
    (run_dir / "clients" / "0").mkdir(parents=True)
    (run_dir / "clients" / "0" / "selection.json").write_text("{}")
    (run_dir / "clients" / "0" / "state.safetensors").write_bytes(b"resume state")
    log = run_dir.parent / "seed-1.log"
    log.write_text(log.read_text().replace("flexmoe run ...", f"flexmoe run --output-dir {run_dir}"))
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "server.safetensors").write_bytes(b"weights")
    archive = tmp_path / "archive"
    monkeypatch.setattr(fidelity, "_commit", lambda: "feedbeef")
    runs, _ = fidelity.plan_runs({"persona": ("flex",)}, (1,), [], fake_runs.parent, archive)
    (run,) = runs
    assert run.status == "finished" and run.results == run_dir  # finished where it ran, not yet archived
    assert fidelity.archive_run(run) is None
    kept = archive / "persona" / "flex" / "seed-1"
    assert run.results == kept
    assert sorted(str(p.relative_to(kept)) for p in kept.rglob("*") if p.is_file()) == [
        "clients/0/selection.json", "config.toml", "evals/round-5/personal-client-0.json", "metrics.jsonl",
        "provenance.json", "summary.json"]
    assert json.loads((kept / "provenance.json").read_text())["commit"] == "feedbeef"
    assert (kept.parent / "seed-1.log").read_text() == log.read_text().replace(
        str(fake_runs.parent), "$FLEXMOE_FIDELITY_ROOT")  # the machine's paths left out
    assert str(tmp_path) not in "".join(p.read_text() for p in kept.parent.rglob("*") if p.is_file())
    assert fidelity.step_seconds(kept) == fidelity.step_seconds(run_dir)
    # another machine: the run directory gone, the archive alone says the run is finished
    shutil.rmtree(fake_runs)
    (run,) = fidelity.plan_runs({"persona": ("flex",)}, (1,), [], fake_runs.parent, archive)[0]
    assert run.status == "finished" and run.results == kept and fidelity.archive_run(run) is None


def test_an_archived_run_with_another_config_is_refused_not_reused(tmp_path, monkeypatch):
    archive = tmp_path / "archive"
    (run,) = fidelity.plan_runs({"persona": ("flex",)}, (1,), [], tmp_path / "root", archive)[0]
    run.archived.mkdir(parents=True)
    (run.archived / "config.toml").write_text('method = "fedavg"\n')
    (run.archived / "summary.json").write_text(json.dumps({"rounds": 5, "rounds_completed": 5, "wall_seconds": 1.0}))
    monkeypatch.setattr(fidelity.subprocess, "run", lambda *a, **k: pytest.fail("a run was started"))
    why = fidelity.run_one(run)
    assert why.startswith(f"{run.archived} holds a run with another config")


def test_the_conflict_line_reads_whether_a_run_projected_from_its_config(tmp_path):
    off, default = tmp_path / "off", tmp_path / "default"
    off.mkdir()
    (off / "config.toml").write_text('method = "fcmoe"\n[fcmoe]\nproject = false\n')
    default.mkdir()
    (default / "config.toml").write_text('method = "fcmoe"\n')
    assert fidelity._projects(off) is False
    assert fidelity._projects(default) is True and fidelity._projects(tmp_path / "no-config") is True


def test_the_glance_table_puts_each_claims_verdicts_side_by_side_across_settings():
    from flexmoe.analysis.stats import PairedDifference

    def diff(value, low, high, signs):  # signs: each seed's mean difference
        return PairedDifference(value, low, high, 10, value, dict(enumerate(signs, start=1)))

    ahead = diff(+0.05, +0.01, +0.09, (+0.04, +0.06))  # CI above 0, both seeds +: supported
    tie = diff(+0.01, -0.02, +0.04, (+0.02, -0.01))  # CI covers 0: inconclusive
    lower_loss = diff(-0.10, -0.12, -0.08, (-0.1, -0.1))  # A's loss lower: knowledge supported
    row = lambda seeds, rouge: fidelity.ClaimResult("(c) the gate helps", "flex", "flex-nogate", seeds,  # noqa: E731
                                                   rouge, tie, None, lower_loss)
    lines = fidelity.glance_table({"paper-category": [row((1, 2), ahead)], "persona": [row((1,), tie)]})
    assert lines[0] == ("| claim (A better than B) | paper-category: ROUGE-L / exact / knowledge (seeds) | "
                        "persona: ROUGE-L / exact / knowledge (seeds) |")
    assert lines[2] == ("| (c) the gate helps (flex vs flex-nogate) | supported / inconclusive / supported (1,2) | "
                        "inconclusive / inconclusive / supported (1) |")
    only_one = fidelity.glance_table({"paper-category": [row((1, 2), ahead)], "persona": []})
    assert "persona" not in only_one[0] and fidelity.glance_table({"persona": []}) == []

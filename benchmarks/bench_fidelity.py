"""The fidelity study: every claim of the FLEx paper and of FC-MoE tested with paired statistics.

Two settings of the builtin data (both in the datasheet): `persona` (clients that conflict: each
answers in its own convention, Dirichlet(0.5) content skew, at most 256 training examples) and
`paper-category` (the FLEx paper's split: two task categories per client). In each, `flexmoe
compare` runs the methods over the seeds on the same partitions; every claim is then a paired
difference (A − B on the same examples: the same stratified test sample of each client, the same
probes, the same held-out documents) with its stratified bootstrap 95% CI over clients × examples
pooled across seeds and its sign per seed, judged supported / contradicted / inconclusive
(`flexmoe.analysis.stats.verdict`).

The full study takes hours on a small CPU: FLEXMOE_FIDELITY_METHODS (";"-separated
`setting=method,method`; a setting left out is not run), FLEXMOE_FIDELITY_SEEDS and
FLEXMOE_FIDELITY_SET (";"-separated KEY=VALUE overrides for every run, on top of `STUDY_SET`)
reduce it, and the result file says so; FLEXMOE_FIDELITY_REPORT_ONLY=1 runs nothing and reports the
finished runs only (those whose summary says every round ran); FLEXMOE_FIDELITY_NOTE adds a
paragraph on how the runs were made. Finished runs are skipped, so the runs can be made
beforehand by parallel `flexmoe compare` commands into the same directories.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import shlex

from benchmarks.machine import header_markdown, write_result

SETTINGS = {
    "persona": ("configs/persona.toml", "clients that conflict (each its own answer convention, Dirichlet(0.5) "
                "content skew over domains, at most 256 training examples each)"),
    "paper-category": ("configs/paper-category.toml", "the FLEx paper's split (two task categories per client)"),
}
METHODS = {
    "persona": ("flex", "fedavg", "fedavg+experts", "local", "fedper", "fedavg-ft", "fcmoe", "flex-random",
                "flex-nogate", "flex-zero"),
    "paper-category": ("flex", "fedavg", "fedavg+experts", "local", "fedper", "fedavg-ft", "fcmoe"),
}
SEEDS = (1, 2, 3)  # the defaults were chosen on seed 100 (development seed), never on these
# the study's training budget is the default run's, written out so that the study does not move
# with a later default; its evaluation sizes are smaller than a single run's defaults, so that the
# study fits a small machine (pooled over 3 seeds × 4 clients: 768 answer pairs, 3,600 probe pairs)
STUDY_SET = ("rounds=5", "train.local_steps=30", "train.lr=4e-3", "train.precision=bf16",
             "eval.max_test_examples=64", "eval.max_probes=300", "eval.knowledge_max_docs=256",
             "eval.global_model=false", "eval.every=0", "eval.batch_size=8")

# (A, B, the claim "A is better than B"): the paper's claims first, then its ablations, then FC-MoE's
CLAIMS = (
    ("flex", "fedavg", "FLEx beats MoE + FedAvg with the same shared part (attention LoRA)"),
    ("flex", "fedavg+experts", "FLEx beats MoE + FedAvg with trainable experts (the paper's MoE + X)"),
    ("flex", "local", "FLEx beats local training alone"),
    ("flex", "fcmoe", "FLEx beats FC-MoE"),
    ("flex", "fedper", "grafting beats the same personal capacity as expert LoRA (FedPer-style control)"),
    ("flex", "fedavg-ft", "FLEx beats FedAvg followed by local fine-tuning"),
    ("flex", "flex-random", "the reconstruction-selected expert beats a random one"),
    ("flex", "flex-nogate", "the adaptive gate helps (no-gate ablation)"),
    ("flex", "flex-zero", "grafting a pretrained expert beats a zero-initialised one of the same shape"),
    ("fcmoe", "fedavg+experts", "FC-MoE's conflict-aware aggregation beats FedAvg of the same trainables"),
)


def _env_list(name: str, default: tuple) -> tuple:
    text = os.environ.get(name, "")
    return tuple(item.strip() for item in text.split(",") if item.strip()) if text else default


def main(results_dir: pathlib.Path) -> None:
    from flexmoe.commands import compare

    chosen = chosen_methods(os.environ.get("FLEXMOE_FIDELITY_METHODS", ""))
    seeds = tuple(int(s) for s in _env_list("FLEXMOE_FIDELITY_SEEDS", tuple(map(str, SEEDS))))
    extra = [s.strip() for s in os.environ.get("FLEXMOE_FIDELITY_SET", "").split(";") if s.strip()]
    out = pathlib.Path("runs") / f"fidelity-{datetime.date.today().isoformat()}"
    studied = []
    report_only = os.environ.get("FLEXMOE_FIDELITY_REPORT_ONLY") == "1"
    for setting, methods in chosen.items():
        args = argparse.Namespace(methods=",".join(methods), seeds=",".join(map(str, seeds)),
                                  config=SETTINGS[setting][0], overrides=[*STUDY_SET, *extra],
                                  output_dir=str(out / setting), reference="fedavg" if "fedavg" in methods else None,
                                  quiet=True)
        if report_only:
            report_finished(out / setting, methods, seeds, compare._command(args), args.reference)
        else:
            compare.run(args)
        studied.append((setting, methods, compare._command(args)))
    write_fidelity(results_dir, out, studied, seeds, extra)


def report_finished(root: pathlib.Path, methods: tuple, seeds: tuple, command: str, reference: str | None) -> None:
    """The comparison report of the finished runs under `root` (nothing is run)."""
    from flexmoe.report import write_compare_report

    finished = [root / m / f"seed-{s}" for m in methods for s in seeds if _finished(root / m / f"seed-{s}")]
    if finished:
        done = {path.parent.name for path in finished}
        write_compare_report(finished, root, command=command, reference=reference if reference in done else None)


def _finished(run_dir: pathlib.Path) -> bool:
    summary = run_dir / "summary.json"
    if not summary.exists():
        return False
    found = json.loads(summary.read_text())
    return found.get("wall_seconds") is not None and found.get("rounds_completed") == found.get("rounds", 5)


def chosen_methods(text: str) -> dict[str, tuple[str, ...]]:
    """{setting: methods} from "setting=m,m;setting=m" (every setting's full list when empty)."""
    if not text.strip():
        return dict(METHODS)
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        setting, _, names = part.partition("=")
        if setting.strip() not in SETTINGS:
            raise SystemExit(f"FLEXMOE_FIDELITY_METHODS: unknown setting {setting.strip()!r}; settings: {', '.join(SETTINGS)}")
        out[setting.strip()] = tuple(n.strip() for n in names.split(",") if n.strip())
    return out


def write_fidelity(results_dir: pathlib.Path, out: pathlib.Path, studied: list, seeds: tuple, extra: list) -> None:
    full = (len(studied) == len(SETTINGS) and all(set(m) == set(METHODS[s]) for s, m, _ in studied)
            and set(seeds) >= set(SEEDS) and not extra)
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in (
        ("FLEXMOE_FIDELITY_METHODS", "" if full else ";".join(f"{s}={','.join(m)}" for s, m, _ in studied)),
        ("FLEXMOE_FIDELITY_SEEDS", ",".join(map(str, seeds)) if seeds != SEEDS else ""),
        ("FLEXMOE_FIDELITY_SET", ";".join(extra))) if v)
    lines = [header_markdown("The fidelity study: FLEx and FC-MoE claims with paired statistics",
                             f"{env + ' ' if env else ''}python -m benchmarks fidelity"), ""]
    if not full:
        left = [f"{m} ({s})" for s, methods, _ in studied for m in METHODS[s] if m not in methods]
        lines += ["**Reduced study.** " + "; ".join(f"{s}: {', '.join(m)}" for s, m, _ in studied)
                  + f"; seeds {', '.join(map(str, seeds))}" + (f"; not run: {', '.join(left)}" if left else "")
                  + (f"; extra overrides: {', '.join(extra)}" if extra else "") + ".", ""]
    note = os.environ.get("FLEXMOE_FIDELITY_NOTE", "")
    if note:
        lines += [note, ""]
    lines += ["Commands (each setting is one `flexmoe compare`):", "", *(f"    {c}" for _, _, c in studied), "",
              _how_to_read(), ""]
    for setting, methods, _ in studied:
        lines += study_section(out / setting, setting, methods, seeds)
    write_result(results_dir, "fidelity", lines, echo=False)


def _how_to_read() -> str:
    return ("How to read a claim row: *A − B* on the same examples, pooled over clients and seeds, with the "
            "stratified bootstrap 95% CI (2000 resamples) and the sign of each seed's difference. ROUGE-L and "
            "exact match: higher is better; held-out loss per document: lower is better (a negative difference "
            "means A kept more knowledge); probes: accuracy difference over every (client, probe) pair, exact "
            "McNemar p. *Supported*: the CI excludes 0 on A's side and every seed agrees; *contradicted*: the "
            "same on B's side; otherwise *inconclusive*. The verdict column judges ROUGE-L; the knowledge "
            "verdict judges the held-out loss.")


def study_section(root: pathlib.Path, setting: str, methods: tuple, seeds: tuple) -> list[str]:
    from flexmoe.analysis.stats import verdict
    from flexmoe.report.comparison import fmt_diff, fmt_signs

    runs = {m: {s: root / m / f"seed-{s}" for s in seeds if _finished(root / m / f"seed-{s}")} for m in methods}
    lines = [f"## Setting: {setting} — {SETTINGS[setting][1]}", "",
             "| claim (A better than B) | ROUGE-L A − B [95% CI] | signs | verdict | exact match A − B | "
             "held-out loss A − B [95% CI] | knowledge verdict | probes A − B (McNemar p) |",
             "|---|---:|---:|---|---:|---:|---|---:|"]
    for a, b, claim in CLAIMS:
        common = sorted(set(runs.get(a, {})) & set(runs.get(b, {})))
        if not common:
            continue
        rouge, exact, (probes, docs) = claim_stats(runs[a], runs[b], common)
        knowledge = verdict(docs, direction=-1) if docs else "n/a"  # a lower loss is better
        lines.append(f"| {claim} ({a} vs {b}) | {fmt_diff(rouge)} | {fmt_signs(rouge)} | "
                     f"{verdict(rouge) if rouge else 'n/a'} | {fmt_diff(exact)} | {fmt_diff(docs)} | {knowledge} | "
                     + (f"{probes.accuracy_a - probes.accuracy_b:+.3f} (p = {probes.p_value:.2g})" if probes else "n/a")
                     + " |")
    lines.append("")
    for label, found in conflict_stats({m: list(r.values()) for m, r in runs.items()}).items():
        lines.append(f"- {label}: {found['fcmoe_conflict_fraction']:.1%} of the (client, expert or module) updates "
                     "conflicted with their consensus (negative cosine) and were projected, averaged over rounds and "
                     "seeds." + (f" Cosine of an update with its consensus: mean {found['fcmoe_mean_consensus_cosine']:.3f}, "
                                 f"smallest {found['fcmoe_min_consensus_cosine']:+.3f}; between two clients' updates of "
                                 f"the same row: mean {found['fcmoe_mean_client_cosine']:.3f}."
                                 if "fcmoe_mean_client_cosine" in found else ""))
    lines += ["", *_report_body(root / "report.md"), ""]
    return lines


def claim_stats(runs_a: dict, runs_b: dict, seeds: list[int]):
    """ROUGE-L and exact-match paired differences of A's and B's personalised models, and their
    knowledge (probes, held-out documents) paired per (seed, client)."""
    from flexmoe.analysis.paired import answer_scores, difference, knowledge_between, last_round

    def personal(run_dir, metric):
        return answer_scores(run_dir, last_round(run_dir), "personal", metric)

    rouge, exact = (difference([(s, personal(runs_a[s], metric), personal(runs_b[s], metric)) for s in seeds])
                    for metric in ("rouge_l", "exact_match"))
    return rouge, exact, knowledge_between([(s, runs_a[s], runs_b[s]) for s in seeds])


def conflict_stats(runs: dict[str, list[pathlib.Path]]) -> dict[str, dict[str, float]]:
    """Per FC-MoE method: the conflict fraction and the mean cosines averaged over rounds and seeds,
    the smallest cosine with the consensus over all of them."""
    out = {}
    for label, run_dirs in runs.items():
        records = [record for run_dir in run_dirs
                   for record in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                   if record.get("kind") == "server" and "fcmoe_conflict_fraction" in record]
        if not records:
            continue
        found = {}
        for key in ("fcmoe_conflict_fraction", "fcmoe_mean_consensus_cosine", "fcmoe_mean_client_cosine"):
            values = [r[key] for r in records if key in r]
            if values:
                found[key] = sum(values) / len(values)
        smallest = [r["fcmoe_min_consensus_cosine"] for r in records if "fcmoe_min_consensus_cosine" in r]
        if smallest:
            found["fcmoe_min_consensus_cosine"] = min(smallest)
        out[label] = found
    return out


def _report_body(report_file: pathlib.Path) -> list[str]:
    """The comparison report without its title, command and plots (nor the blank lines around them)."""
    if not report_file.exists():
        return []
    report = report_file.read_text()
    lines = [line for line in report[report.index("Each cell"):].splitlines() if not line.startswith("![")]
    return [line for i, line in enumerate(lines) if line or (i > 0 and lines[i - 1])]

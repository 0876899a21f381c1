"""Fidelity to the FLEx paper's claims on the embedded default (shipped tiny MoE, builtin data).

Runs `flexmoe compare` (in-process engine, default run config) for FLEx, the "MoE + X"
baselines, FC-MoE, FLEx + FC-MoE and FLEx's ablations over several seeds, then states, from
the measured numbers alone, where the results agree or disagree with the paper: FLEx has the
best average personalised ROUGE-L, the best knowledge retention and better expert-load balance,
and FLEx without its gate collapses. A second comparison runs FC-MoE in its own setting
(Dirichlet α = 0.1 clients) against MoE + FedAvg on the same trainables, and FLEx + FC-MoE
against FLEx, with the measured fraction of conflicting updates.

The full set takes hours on a small CPU; FLEXMOE_FIDELITY_METHODS, FLEXMOE_FIDELITY_FCMOE_METHODS
("none" skips the second comparison), FLEXMOE_FIDELITY_SEEDS and FLEXMOE_FIDELITY_SET
(";"-separated KEY=VALUE run-config overrides) run a reduced set, and the result file then says so;
FLEXMOE_FIDELITY_NOTE adds a paragraph on how the runs were made.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import shlex

from benchmarks.machine import header_markdown, write_result

METHODS = ("flex", "fedavg", "fedprox", "scaffold", "fedavgm", "fedadagrad", "fedyogi", "fedadam", "local",
           "fcmoe", "flex+fcmoe", "flex-nogate", "flex-random", "flex-k2", "flex-k3")
SEEDS = (0, 1, 2)
ABLATIONS = ("flex-nogate", "flex-random", "flex-k2", "flex-k3")
NOT_BASELINES = (*ABLATIONS, "flex+fcmoe")  # FLEx itself with another aggregation rule
FCMOE_METHODS = ("fcmoe", "flex+fcmoe", "fedavg+experts", "flex")
FCMOE_SETTING = ("data.partition=dirichlet", "data.alpha=0.1")  # FC-MoE's non-IID clients
FCMOE_DIR = "fcmoe-dirichlet-0.1"


def _env_list(name: str, default: tuple) -> tuple:
    text = os.environ.get(name, "")
    return tuple(item.strip() for item in text.split(",") if item.strip()) if text else default


def main(results_dir: pathlib.Path) -> None:
    from flexmoe.commands import compare

    methods = _env_list("FLEXMOE_FIDELITY_METHODS", METHODS)
    seeds = tuple(int(s) for s in _env_list("FLEXMOE_FIDELITY_SEEDS", tuple(map(str, SEEDS))))
    overrides = [s.strip() for s in os.environ.get("FLEXMOE_FIDELITY_SET", "").split(";") if s.strip()]
    day = datetime.date.today().isoformat()
    out = pathlib.Path("runs") / f"fidelity-{day}"
    args = argparse.Namespace(methods=",".join(methods), seeds=",".join(map(str, seeds)), config=None,
                              overrides=overrides, output_dir=str(out), quiet=True)
    compare.run(args)
    commands = [compare._command(args)]
    fcmoe_methods = _env_list("FLEXMOE_FIDELITY_FCMOE_METHODS", FCMOE_METHODS)
    fcmoe_methods = () if fcmoe_methods == ("none",) else fcmoe_methods
    if fcmoe_methods:
        fcmoe_args = argparse.Namespace(**{**vars(args), "methods": ",".join(fcmoe_methods),
                                           "overrides": [*overrides, *FCMOE_SETTING], "output_dir": str(out / FCMOE_DIR)})
        compare.run(fcmoe_args)
        commands.append(compare._command(fcmoe_args))
    write_fidelity(results_dir, out, methods, fcmoe_methods, seeds, overrides, commands)


def write_fidelity(results_dir: pathlib.Path, out: pathlib.Path, methods, fcmoe_methods, seeds, overrides,
                   commands: list[str]) -> None:
    summary = json.loads((out / "summary.json").read_text())
    report = (out / "report.md").read_text()
    reduced = (set(methods) != set(METHODS) or set(fcmoe_methods) != set(FCMOE_METHODS) or len(seeds) < len(SEEDS)
               or overrides)
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in (
        ("FLEXMOE_FIDELITY_METHODS", ",".join(methods)), ("FLEXMOE_FIDELITY_SEEDS", ",".join(map(str, seeds))),
        ("FLEXMOE_FIDELITY_SET", ";".join(overrides))) if v)
    lines = [header_markdown("Fidelity to the FLEx paper on the embedded default",
                             f"{env + ' ' if env else ''}python -m benchmarks fidelity"), ""]
    if reduced:
        missing = [m for m in METHODS if m not in methods] + [f"{m} (α = 0.1)" for m in FCMOE_METHODS
                                                               if m not in fcmoe_methods]
        lines += [f"**Reduced run.** Methods: {', '.join(methods)}; seeds: {', '.join(map(str, seeds))}"
                  + (f"; not run: {', '.join(missing)}" if missing else "")
                  + (f"; config overrides: {', '.join(overrides)}" if overrides else "; default run config")
                  + ". The full set is `python -m benchmarks fidelity` with no environment variables.", ""]
    note = os.environ.get("FLEXMOE_FIDELITY_NOTE", "")
    if note:  # how the runs were made, when that is not the single command above
        lines += [note, ""]
    lines += ["Equivalent commands:", "", *(f"    {command}" for command in commands), "",
              "## The paper's claims against these numbers", ""]
    lines += [f"- {claim}" for claim in claims(summary)]
    lines += ["", "## Results: the paper's setting (pathological non-IID clients, one domain each)", ""]
    lines += _report_body(report)
    if fcmoe_methods:
        fcmoe_out = out / FCMOE_DIR
        fcmoe_summary = json.loads((fcmoe_out / "summary.json").read_text())
        lines += ["", "## FC-MoE in its own setting (Dirichlet α = 0.1 over domains)", ""]
        lines += [f"- {claim}" for claim in fcmoe_claims(fcmoe_summary, conflict_fractions(fcmoe_summary))]
        lines += [""] + _report_body((fcmoe_out / "report.md").read_text())
    write_result(results_dir, "fidelity", lines, echo=False)


def _report_body(report: str) -> list[str]:
    """The comparison report without its title, command and plots (nor the blank lines around them)."""
    lines = [line for line in report[report.index("Each cell"):].splitlines() if not line.startswith("![")]
    return [line for i, line in enumerate(lines) if line or (i > 0 and lines[i - 1])]


def conflict_fractions(summary: dict) -> dict[str, float]:
    """Per method: the mean over rounds and seeds of the aggregation's fraction of conflicting updates."""
    out = {}
    for label, entry in summary.items():
        values = []
        for run_dir in entry["runs"]:
            for line in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines():
                record = json.loads(line)
                if record.get("kind") == "server" and "fcmoe_conflict_fraction" in record:
                    values.append(record["fcmoe_conflict_fraction"])
        if values:
            out[label] = sum(values) / len(values)
    return out


def fcmoe_claims(summary: dict, conflicts: dict[str, float]) -> list[str]:
    """FC-MoE against plain FedAvg of the same trainables, and FLEx + FC-MoE against FLEx."""
    out = []
    for label, reference in (("fcmoe", "fedavg+experts"), ("flex+fcmoe", "flex")):
        if label not in summary or reference not in summary:
            continue
        for key, better in (("rouge_l_avg", "higher"), ("knowledge_loss", "lower")):
            ours, theirs = _value(summary, label, key), _value(summary, reference, key)
            spread = max(summary[label][key].get("std") or 0.0, summary[reference][key].get("std") or 0.0)
            wins = ours > theirs if better == "higher" else ours < theirs
            out.append(f"{label} vs {reference}, {key} ({better} is better): {_spread(summary, label, key)} vs "
                       f"{_spread(summary, reference, key)} — {'better' if wins else 'not better'}, the gap "
                       f"{abs(ours - theirs):.4f} is {'larger than' if abs(ours - theirs) > spread else 'within'} "
                       "the seed spread.")
    for label, fraction in conflicts.items():
        out.append(f"{label}: on average {fraction:.1%} of the (client, expert or module) updates conflicted "
                   "with their consensus (negative cosine) and were projected.")
    return out


def _value(summary: dict, label: str, key: str):
    entry = summary.get(label, {}).get(key)
    return None if entry is None else entry["mean"]


def _spread(summary: dict, label: str, key: str) -> str:
    entry = summary[label][key]
    return f"{entry['mean']:.4f}" + (f" ± {entry['std']:.4f}" if entry.get("std") is not None else "")


def claims(summary: dict) -> list[str]:
    """One sentence per claim of the paper, each decided by the measured means."""
    if "flex" not in summary:
        return ["FLEx was not run, so no claim can be checked."]
    baselines = [label for label in summary if label != "flex" and label not in NOT_BASELINES]
    out = [
        _best(summary, baselines, "rouge_l_avg", higher=True,
              claim="best average personalised ROUGE-L"),
        _best(summary, baselines, "knowledge_loss", higher=False,
              claim="best knowledge retention (lowest held-out loss after training)"),
        _best(summary, baselines, "probe_accuracy", higher=True, claim="best knowledge-probe accuracy"),
        _best(summary, baselines, "expert_load_std", higher=False,
              claim="better load balance (lowest expert-load std)"),
    ]
    flex, nogate = _value(summary, "flex", "rouge_l_avg"), _value(summary, "flex-nogate", "rouge_l_avg")
    if flex is not None and nogate is not None:
        verdict = "agrees (collapse)" if nogate < 0.5 * flex else "disagrees (no collapse)"
        rouge = [_spread(summary, label, "rouge_l_avg") for label in ("flex-nogate", "flex")]
        loss = [_spread(summary, label, "knowledge_loss") for label in ("flex-nogate", "flex")]
        out.append(f"No-gate collapse: FLEx without its gate reaches ROUGE-L {rouge[0]} vs FLEx {rouge[1]}, "
                   f"knowledge loss {loss[0]} vs {loss[1]}: {verdict} (collapse = below half of FLEx's ROUGE-L).")
    for label, what in (("flex-random", "a random expert instead of the reconstruction-selected one"),
                        ("flex-k2", "k = 2 grafted experts"), ("flex-k3", "k = 3 grafted experts")):
        if _value(summary, label, "rouge_l_avg") is not None:
            out.append(f"Ablation, {what}: ROUGE-L {_spread(summary, label, 'rouge_l_avg')} vs FLEx "
                       f"{_spread(summary, 'flex', 'rouge_l_avg')}.")
    return out


def _best(summary: dict, baselines: list[str], key: str, higher: bool, claim: str) -> str:
    flex = _value(summary, "flex", key)
    others = {label: _value(summary, label, key) for label in baselines if _value(summary, label, key) is not None}
    if flex is None or not others:
        return f"FLEx {claim}: not measured."
    best = max(others, key=others.get) if higher else min(others, key=others.get)
    wins = flex > others[best] if higher else flex < others[best]
    # a gap smaller than either seed spread is not evidence either way
    spread = max(summary["flex"][key].get("std") or 0.0, summary[best][key].get("std") or 0.0)
    gap = abs(flex - others[best])
    strength = "larger than" if gap > spread else "within"
    verdict = "ties" if gap < 1e-12 else "agrees" if wins else "disagrees"
    return (f"FLEx {claim}: FLEx {_spread(summary, 'flex', key)}, best baseline {best} "
            f"{_spread(summary, best, key)} — {verdict}, the gap {gap:.4f} is "
            f"{strength} the seed spread (among {len(others)} baselines).")

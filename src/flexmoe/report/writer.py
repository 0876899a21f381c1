"""`report.md` + `plots/*.png` for one run or for a comparison of runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from flexmoe.errors import FlexmoeError
from flexmoe.files import write_text_atomic
from flexmoe.report import comparison, plots, tables
from flexmoe.report.runs import CLIENTS_FILE, Run, mean_std, read_run


def write_run_report(run_dir: Path, clients: list | None = None) -> Path:
    """Write `report.md` and `plots/` of one run from its files.

    `clients` (objects or dicts with client_id, domains, num_train, num_test, and optionally
    categories, truncated, unusable) are saved to
    `clients.json` first, so a later `flexmoe report` shows them too.
    """
    run_dir = Path(run_dir)
    if clients is not None:
        # the skipped rows are the data file's, listed once in the metrics and the summary
        rows = [{k: v for k, v in (dataclasses.asdict(c) if dataclasses.is_dataclass(c) else dict(c)).items()
                 if k != "skipped"} for c in clients]
        write_text_atomic(run_dir / CLIENTS_FILE, json.dumps(rows, indent=1) + "\n")
    run = read_run(run_dir)
    summary, config = run.summary, run.config
    lead = tables.content_free_lead({run.label: [run]})
    lines = [
        f"# flexmoe run: {run.label}",
        "",
        *([lead, ""] if lead else []),
        f"Rounds completed: {summary.get('rounds_completed', len(run.servers()))} of {config.get('rounds')}; "
        f"{config.get('num_clients')} clients ({config.get('clients_per_round')} per round); seed {run.seed}"
        + (f"; wall time {summary['wall_seconds']:.0f} s." if summary.get("wall_seconds") is not None else "."),
        "",
        "## Personalised evaluation (last evaluated round)",
        "",
        *tables.client_table(run),
        "",
        "ROUGE-L: mean F1 (rouge-score, stemmed) of greedy answers on a stratified sample of each client's own "
        "test split (`evaluated` examples, the same for every method of a seed), by its personalised model; base: "
        "the untouched base model; exact match: the normalised answer equals the reference; the **mean** row "
        "is unweighted (each client counts once). Knowledge, probe and routing measures use the "
        "held-out corpus and the knowledge probes; routing drift is the total-variation distance between "
        "the model's and the base's expert-load distributions, averaged over MoE layers.",
        "",
        f"Personal state kept per client (never sent): {summary.get('personal_bytes_per_client', 0):,} bytes "
        "(the graft and gate, or the personal LoRA, as stored on the client's disk; the largest client's).",
        "",
    ]
    for extra in (tables.skipped_lines(run), tables.small_test_lines([run]), tables.truncation_lines(run),
                  tables.personal_lines(run)):
        if extra:
            lines += [*extra, ""]
    lines += comparison.run_lines(run)
    lines += tables.grafting_lines(run)
    reliability = tables.reliability_lines(run)
    if reliability:
        lines += ["## Failures, rejections and privacy", "", *reliability, ""]
    retention = tables.retention_lines(run)
    if retention:
        lines += ["## Knowledge retention", "", *retention, ""]
    lines += ["## Rounds", "", *tables.round_table(run), ""]
    lines += _run_plots(run)
    write_text_atomic(run_dir / "report.md", "\n".join(lines))
    return run_dir / "report.md"


def _run_plots(run: Run) -> list[str]:
    out = run.path / "plots"
    lines = []
    name = plots.run_rounds(run, out / "rounds.png")
    if name:
        lines += ["![training loss, ROUGE-L and knowledge loss per round](plots/rounds.png)", ""]
    if plots.run_clients(run, out / "clients.png"):
        lines += ["![per-client learning curves: local train loss and personalised ROUGE-L per round]"
                  "(plots/clients.png)", ""]
    if plots.run_bytes(run, out / "bytes.png"):
        lines += ["![bytes up and down per round, and cumulated](plots/bytes.png)", ""]
    if plots.expert_load_heatmaps(_load_panels(run), out / "expert_load.png", title=run.label):
        lines += ["![expert load per client (layers × experts)](plots/expert_load.png)", ""]
    return lines


def _load_panels(run: Run) -> list[tuple[str, dict]]:
    panels = [("base", run.base().get("expert_load_base", {}))]
    panels += [(f"client {r['client']}", r.get("expert_load", {})) for r in run.evals()]
    return panels


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs by label (method or variant), seeds sorted; a label may hold each seed only once."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.label, []).append(run)
    for label, members in groups.items():
        members.sort(key=lambda run: run.seed)
        seeds = [run.seed for run in members]
        if len(set(seeds)) != len(seeds):
            duplicate = next(s for s in seeds if seeds.count(s) > 1)
            paths = [str(run.path) for run in members if run.seed == duplicate]
            raise FlexmoeError(f"{label} seed {duplicate} appears twice ({', '.join(paths)}); pass one of them")
    return groups


def write_compare_report(run_dirs: list[Path], out_dir: Path, title: str = "flexmoe comparison",
                         command: str | None = None, reference: str | None = None) -> Path:
    """Compare the runs in `run_dirs` by method over seeds: `out_dir/report.md`, `plots/`, `summary.json`.
    Paired statistics compare every method with the base and with `reference` (default: the best baseline)."""
    out_dir = Path(out_dir)
    groups = group_runs([read_run(Path(d)) for d in run_dirs])
    if reference is not None and reference not in groups:
        raise FlexmoeError(f"--reference {reference!r} is not among the compared methods ({', '.join(groups)})")
    notice = tables.content_free_lead(groups)
    lead = "exact_match" if notice else "rouge_l"
    small = tables.small_test_lines([run for runs in groups.values() for run in runs])
    paired_lines, paired = comparison.compare_lines(groups, reference or comparison.best_baseline(groups, lead), lead)
    lines = [f"# {title}", ""]
    if notice:
        lines += [notice, ""]
    if command:
        lines += ["Command:", "", f"    {command}", ""]
    lines += [
        "Each cell: mean ± sample standard deviation over seeds (a seed fixes the partition, the LoRA "
        "initialisation and the sampling, identical for every method; client columns index each seed's own "
        "partition, so across seeds they hold different data). ROUGE-L and knowledge loss are the "
        "last evaluation's means over clients (global model: the aggregated shared weights alone, without "
        "any client's personal part, on every client's test split); Δ vs base is the change of held-out loss from the untouched "
        "base (positive = knowledge lost); bytes / round counts every serialised message, up and down, of all "
        "sampled clients; personal bytes / client is what a client stores of its personal part (graft file, "
        "personal LoRA or fine-tuned weights, measured on its disk after its last round); wall s is the run's "
        "wall-clock time.",
        "",
        *tables.compare_table(groups, lead),
        "",
        *([*small, ""] if small else []),
        "The untouched base model and the content-free answerer (each client's answer template, no facts), per seed:",
        "",
        *tables.base_table(groups),
        "",
        *paired_lines,
    ]
    plot_dir = out_dir / "plots"
    for key, ylabel, name in (("rouge_l_avg", "mean personalised ROUGE-L", "rouge_l.png"),
                              ("train_loss", "train loss (response tokens)", "train_loss.png"),
                              ("knowledge_loss", "held-out knowledge loss", "knowledge_loss.png")):
        if plots.compare_rounds(groups, key, ylabel, plot_dir / name):
            lines += [f"![{ylabel} per round](plots/{name})", ""]
    if plots.compare_bytes(groups, plot_dir / "bytes.png"):
        lines += ["![bytes per round, up and down](plots/bytes.png)", ""]
    for label, runs in groups.items():
        name = f"expert_load-{_slug(label)}.png"
        if plots.expert_load_heatmaps(_load_panels(runs[0]), plot_dir / name, title=f"{label}, seed {runs[0].seed}"):
            lines += [f"![expert load per client, {label}](plots/{name})", ""]
    write_text_atomic(out_dir / "report.md", "\n".join(lines))
    summary = _compare_summary(groups)
    if paired:
        summary["paired"] = paired
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return out_dir / "report.md"


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in label)


def _compare_summary(groups: dict[str, list[Run]]) -> dict:
    """Per method: the seeds, the runs' directories, and mean/std of the headline numbers."""
    out = {}
    for label, runs in groups.items():
        row = {"seeds": [run.seed for run in runs], "runs": [str(run.path) for run in runs]}
        for key in ("rouge_l_avg", "exact_match_avg", "rouge_l_global", "knowledge_loss", "probe_accuracy",
                    "expert_load_std", "routing_entropy", "routing_drift"):
            mu, sd = mean_std((run.servers() or [{}])[-1].get(key) for run in runs)
            if mu is not None:
                row[key] = {"mean": mu, "std": sd}
        row["bytes_per_round"] = mean_std([run.bytes_per_round() for run in runs])[0]
        personal = mean_std(run.summary.get("personal_bytes") for run in runs)[0]
        if personal is not None:
            row["personal_bytes"] = personal
        mu, sd = mean_std(run.summary.get("wall_seconds") for run in runs)
        if mu is not None:
            row["wall_seconds"] = {"mean": mu, "std": sd}
        out[label] = row
    return out

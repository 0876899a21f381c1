"""Paired statistics in reports: one run against its base, and methods against the base and a
reference method, from the per-example files (`evals/`, analysis/paired.py)."""

from __future__ import annotations

from flexmoe.analysis.paired import answer_scores, difference, knowledge_pairs, last_round
from flexmoe.analysis.stats import PairedDifference, seed_signs, verdict
from flexmoe.report.runs import Run, mean_std
from flexmoe.report.tables import fmt, table

EXPLANATION = (
    "Paired differences: the same examples scored by both models (the same stratified sample of each "
    "client's test split for every method of a seed). diff = mean over all pooled examples (weighted by "
    "examples); unweighted = the mean of the per-client means; [95% CI] = stratified bootstrap over "
    "clients × examples pooled across seeds (2000 resamples); signs = the sign of each seed's difference. "
    "A claim is *supported* only when the CI excludes 0 and every seed agrees in sign; *contradicted* when "
    "both point the other way; otherwise *inconclusive*."
)


def fmt_diff(result: PairedDifference | None) -> str:
    if result is None:
        return "n/a"
    return f"{result.diff:+.4f} [{result.ci_low:+.4f}, {result.ci_high:+.4f}]"


def fmt_signs(result: PairedDifference | None) -> str:
    if result is None:
        return "n/a"
    return " ".join({1: "+", -1: "−", 0: "0"}[sign] for sign in seed_signs(result).values())


def fmt_summary(found: dict | None) -> str:
    if not found:
        return "n/a"
    return f"{found['diff']:+.4f} [{found['ci_low']:+.4f}, {found['ci_high']:+.4f}] ({found['examples']} pairs)"


def run_lines(run: Run) -> list[str]:
    """One run: its personalised (and global) model against the base and the content-free answerer."""
    s = run.summary
    if "rouge_l_vs_base" not in s:
        return []
    rows = [[title, fmt_summary(s.get(key))] for key, title in (
        ("rouge_l_vs_base", "ROUGE-L, personalised − base"),
        ("exact_match_vs_base", "exact match, personalised − base"),
        ("rouge_l_vs_content_free", "ROUGE-L, personalised − content-free answerer"),
        ("exact_match_vs_content_free", "exact match, personalised − content-free answerer"),
        ("global_rouge_l_vs_base", "ROUGE-L, global model − base"),
        ("doc_loss_vs_base", "held-out loss per document, personalised − base"),
        ("global_doc_loss_vs_base", "held-out loss per document, global model − base"),
    ) if s.get(key)]
    lines = table(["comparison", "diff [95% CI]"], rows, ["---", "---:"])
    for key, who in (("probes_vs_base", "personalised models"), ("global_probes_vs_base", "global model")):
        probes = s.get(key)
        if probes:
            lines += ["", f"Probes, {who} vs base: accuracy {probes['accuracy']:.3f} vs {probes['accuracy_base']:.3f} "
                          f"on {probes['items']} (model, probe) pairs; right only for the model {probes['only_model']}, "
                          f"only for the base {probes['only_base']}; exact McNemar p = {probes['p_value']:.3g}."]
    base, last = run.base(), (run.servers() or [{}])[-1]
    if base.get("rouge_l_avg_content_free") is not None:
        lines += ["", f"Reference rows (last evaluation's sample): base ROUGE-L {fmt(base.get('rouge_l_avg_base'))}, "
                      f"exact match {fmt(base.get('exact_match_avg_base'))}; content-free answerer (right template, "
                      f"no facts) ROUGE-L {fmt(base.get('rouge_l_avg_content_free'))}, exact match "
                      f"{fmt(base.get('exact_match_avg_content_free'))}; personalised ROUGE-L {fmt(last.get('rouge_l_avg'))} "
                      f"(unweighted mean over clients), {fmt(last.get('rouge_l_pooled'))} (pooled over examples)."]
    return ["## Paired statistics", "", EXPLANATION, "", *lines, ""]


def _personal(run: Run, metric: str):
    final = last_round(run.path)
    return answer_scores(run.path, final, "personal", metric) if final is not None else {}


def _base(run: Run, metric: str):
    return answer_scores(run.path, 0, "base", metric)


# methods whose evaluated model is a client's own, not the shared one: never the default reference
PERSONAL_CONTROLS = ("fedper", "fedavg-ft", "local", "fcmoe")


def best_baseline(groups: dict[str, list[Run]], metric: str = "rouge_l") -> str | None:
    """The best *shared federated* baseline (MoE + X: no FLEx variant, no personal control (FedPer,
    FedAvg-FT, Local) and no FC-MoE, whose client-side retention makes its evaluated model personal
    too), by the highest mean `metric` over seeds."""
    key = f"{metric}_avg"
    scores = {label: mean_std((run.servers() or [{}])[-1].get(key) for run in runs)[0]
              for label, runs in groups.items() if is_shared_baseline(runs[0].config)}
    scored = {label: value for label, value in scores.items() if value is not None}
    return max(scored, key=scored.get) if scored else None


def is_shared_baseline(config: dict) -> bool:
    method = config.get("method", "flex")
    return not method.startswith("flex") and method not in PERSONAL_CONTROLS


def compare_rows(groups: dict[str, list[Run]], reference: str | None, metric: str = "rouge_l") -> dict[str, dict]:
    """Per method: paired `metric` differences against the base and against `reference` (same seed)."""
    out = {}
    by_seed = {run.seed: run for run in groups.get(reference, [])}
    for label, runs in groups.items():
        row = {"vs_base": difference([(run.seed, _personal(run, metric), _base(run, metric)) for run in runs])}
        if reference and label != reference:
            pairs = [(run.seed, _personal(run, metric), _personal(by_seed[run.seed], metric))
                     for run in runs if run.seed in by_seed]
            row["vs_reference"] = difference(pairs)
        mcnemar, docs = knowledge_pairs([(run.seed, run.path) for run in runs], "personal")
        row.update(probes=mcnemar, docs=docs)
        out[label] = row
    return out


METRIC_NAMES = {"rouge_l": "ROUGE-L", "exact_match": "exact match"}


def compare_lines(groups: dict[str, list[Run]], reference: str | None,
                  lead: str = "rouge_l") -> tuple[list[str], dict]:
    """The comparison report's statistics section and its summary.json part; `lead` (the metric the
    report leads with) comes first and decides "better than the reference?"."""
    rows, summary = [], {}
    stats = {metric: compare_rows(groups, reference, metric) for metric in ("rouge_l", "exact_match")}
    other = "rouge_l" if lead == "exact_match" else "exact_match"
    for label in groups:
        first, second = stats[lead][label], stats[other][label]
        vs_ref = first.get("vs_reference")
        probes, docs = first["probes"], first["docs"]
        rows.append([
            label, fmt_diff(first["vs_base"]), fmt_signs(first["vs_base"]),
            fmt_diff(vs_ref) if vs_ref else "—", fmt_signs(vs_ref) if vs_ref else "—",
            verdict(vs_ref) if vs_ref else "—", fmt_diff(second["vs_base"]),
            fmt_diff(second.get("vs_reference")) if second.get("vs_reference") else "—",
            f"{probes.accuracy_a - probes.accuracy_b:+.3f} (p = {probes.p_value:.2g})" if probes else "n/a",
            fmt_diff(docs),
        ])
        rouge, exact = stats["rouge_l"][label], stats["exact_match"][label]
        summary[label] = {
            "rouge_l_vs_base": _as_dict(rouge["vs_base"]), "exact_match_vs_base": _as_dict(exact["vs_base"]),
            **({f"{metric}_vs_reference": {**_as_dict(row["vs_reference"]), "verdict": verdict(row["vs_reference"])}
                for metric, row in (("rouge_l", rouge), ("exact_match", exact)) if row.get("vs_reference")}),
            **({"probes_vs_base": {"items": probes.items, "accuracy": probes.accuracy_a,
                                   "accuracy_base": probes.accuracy_b, "p_value": probes.p_value}} if probes else {}),
            **({"doc_loss_vs_base": _as_dict(docs)} if docs else {}),
        }
    if not any(r[1] != "n/a" for r in rows):
        return [], {}
    ref, name, other_name = reference or "none", METRIC_NAMES[lead], METRIC_NAMES[other]
    header = ["method", f"{name} − base [95% CI]", "signs", f"{name} − {ref} [95% CI]", "signs",
              f"better than {ref}?", f"{other_name} − base", f"{other_name} − {ref}", "probe acc. − base (McNemar)",
              "doc loss − base [95% CI]"]
    lines = ["## Paired statistics", "", EXPLANATION,
             f"Reference method: **{ref}** (default: the shared federated baseline, MoE + X, with the highest mean "
             f"{name}; never a personal control (FedPer, FedAvg-FT, Local) or FC-MoE; `--reference` picks another). "
             f"\"better than {ref}?\" is decided on {name}. Probes: accuracy difference over every (client, probe) "
             "pair pooled across seeds, exact McNemar p; doc loss: each held-out document's mean token loss "
             "(positive = knowledge lost).",
             "", *table(header, rows, ["---", *["---:"] * (len(header) - 1)]), ""]
    return lines, {"reference": reference, "lead_metric": lead, "methods": summary}


def _as_dict(result: PairedDifference | None) -> dict | None:
    return result.as_dict() if result is not None else None

"""Paired comparisons of runs, read from the per-example files every run keeps (`evals/`).

Answers are paired by example id within a (seed, client) cell: the personalised model of a run
against the untouched base on the same sample, or against another method's personalised model
of the same seed (same partition, same sample). Ids are unique within a data file (files
without ids get one per row, `data/formats.py`); answers whose ids repeat (a run directory of an
older flexmoe on data without ids) are paired by position only where both sides list the same
ids in the same order, and otherwise left unpaired with a warning. Knowledge is paired per probe (exact McNemar,
analysis/stats.py) and per held-out document (the document's mean token loss). Every difference
comes with its stratified bootstrap 95% CI over clients × examples pooled across seeds and its
sign per seed (`flexmoe.analysis.stats`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from flexmoe.eval.detail import evaluated_rounds, read_round
from flexmoe.eval.knowledge import pooled_loss
from flexmoe.rundir import EVALS_DIR
from flexmoe.analysis.stats import McNemar, PairedDifference, mcnemar_exact, paired_difference, seed_signs

Answers = tuple[list[str], list[float]]  # one client's example ids and scores, in sample order
Scores = dict[int, Answers]  # client -> its answers

log = logging.getLogger("flexmoe.eval")


def last_round(run_dir: Path) -> int | None:
    rounds = [r for r in evaluated_rounds(Path(run_dir) / EVALS_DIR) if r > 0]
    return rounds[-1] if rounds else None


def answer_scores(run_dir: Path, round_index: int, model: str, metric: str = "rouge_l") -> Scores:
    """Per client: the example ids and `metric` of `model` (personal, global, base, content-free)."""
    out: Scores = {}
    prefix = f"{model}-client-"
    for name, payload in read_round(Path(run_dir) / EVALS_DIR, round_index).items():
        rest = name.removeprefix(prefix)
        if name.startswith(prefix) and rest.isdigit():
            out[int(rest)] = (list(payload["ids"]), list(payload[metric]))
    return out


def knowledge_items(run_dir: Path, round_index: int, name: str) -> dict | None:
    return read_round(Path(run_dir) / EVALS_DIR, round_index).get(f"{name}-knowledge")


def cells(pairs: list[tuple[int, Scores, Scores]]) -> dict:
    """(seed, client) -> (scores of A, scores of B) over the examples both have, in id order."""
    out = {}
    for seed, a, b in pairs:
        for client in sorted(set(a) & set(b)):
            found = paired_scores(a[client], b[client])
            if found is None:
                log.warning("seed %d, client %d: example ids repeat and differ between the two runs' "
                            "samples; its answers are left out of the paired statistics", seed, client)
            elif found[0]:
                out[(seed, client)] = found
    return out


def paired_scores(a: Answers, b: Answers) -> tuple[list[float], list[float]] | None:
    """The scores of the examples both have, by id; by position where both list the same ids in the
    same order; None when ids repeat otherwise (no way to tell which answers match)."""
    (ids_a, scores_a), (ids_b, scores_b) = a, b
    if ids_a == ids_b and len(set(ids_a)) < len(ids_a):
        return list(scores_a), list(scores_b)
    if len(set(ids_a)) < len(ids_a) or len(set(ids_b)) < len(ids_b):
        return None
    by_id_a, by_id_b = dict(zip(ids_a, scores_a)), dict(zip(ids_b, scores_b))
    ids = sorted(set(by_id_a) & set(by_id_b))
    return [by_id_a[i] for i in ids], [by_id_b[i] for i in ids]


def difference(pairs: list[tuple[int, Scores, Scores]]) -> PairedDifference | None:
    found = cells(pairs)
    return paired_difference(found) if found else None


def doc_losses(items: dict) -> list[float]:
    return [nll / count if count else float("nan") for nll, count in items["doc_nll"]]


def knowledge_pairs(runs: list[tuple[int, Path]], model: str, other: str = "base") -> tuple[McNemar | None, PairedDifference | None]:
    """Probes (McNemar, pooled over clients and seeds) and per-document loss differences of
    `model` ("personal": every client's; "global") against the base of the same run."""
    matched = []
    for seed, run_dir in runs:
        final = last_round(run_dir)
        base = knowledge_items(run_dir, 0, other)
        if final is None or base is None:
            continue
        names = ([("global", -1)] if model == "global" else
                 [(f"personal-client-{c}", c) for c in sorted(answer_scores(run_dir, final, "personal"))])
        matched += [((seed, client), knowledge_items(run_dir, final, name), base) for name, client in names]
    return paired_knowledge(matched)


def personal_knowledge(run_dir: Path) -> dict[int, dict]:
    """Per client: the knowledge items of its personalised model at the run's last evaluation."""
    final = last_round(run_dir)
    if final is None:
        return {}
    found = {c: knowledge_items(run_dir, final, f"personal-client-{c}") for c in answer_scores(run_dir, final, "personal")}
    return {c: items for c, items in sorted(found.items()) if items is not None}


def knowledge_between(runs: list[tuple[int, Path, Path]]) -> tuple[McNemar | None, PairedDifference | None]:
    """Probes and per-document losses of two methods' personalised models, paired per (seed, client):
    `runs` holds (seed, run of A, run of B) on the same partition."""
    matched = []
    for seed, run_a, run_b in runs:
        a, b = personal_knowledge(run_a), personal_knowledge(run_b)
        matched += [((seed, client), a[client], b[client]) for client in sorted(set(a) & set(b))]
    return paired_knowledge(matched)


def paired_knowledge(matched: list[tuple[tuple[int, int], dict | None, dict]]) -> tuple[McNemar | None, PairedDifference | None]:
    """McNemar over every (cell, probe) pair and the per-document loss difference, from
    ((seed, client), knowledge items of A, knowledge items of B) triples (A's may be missing)."""
    probes_a: list[int] = []
    probes_b: list[int] = []
    doc_cells: dict = {}
    for cell, items, other in matched:
        if items is None:
            continue
        if "probe_correct" in items and "probe_correct" in other:
            n = min(len(items["probe_correct"]), len(other["probe_correct"]))
            probes_a += items["probe_correct"][:n]
            probes_b += other["probe_correct"][:n]
        n = min(len(items["doc_nll"]), len(other["doc_nll"]))
        kept = [(x, y) for x, y in zip(doc_losses(items)[:n], doc_losses(other)[:n]) if x == x and y == y]
        if kept:
            doc_cells[cell] = ([x for x, _ in kept], [y for _, y in kept])
    mcnemar = mcnemar_exact(probes_a, probes_b) if probes_a else None
    docs = paired_difference(doc_cells) if doc_cells else None
    return mcnemar, docs


def brief(result: PairedDifference | None) -> dict | None:
    """The fields a summary keeps: diff, ci_low, ci_high, examples, the unweighted diff, per-seed signs."""
    if result is None:
        return None
    return {"diff": result.diff, "ci_low": result.ci_low, "ci_high": result.ci_high, "examples": result.examples,
            "diff_unweighted": result.diff_unweighted,
            "seed_signs": {str(s): v for s, v in seed_signs(result).items()}}


def run_statistics(run_dir: Path, seed: int) -> dict:
    """What summary.json gains: the personalised model against the base (ROUGE-L, exact match),
    against the content-free answerer, the global model against the base, and knowledge."""
    final = last_round(run_dir)
    if final is None:
        return {}
    one = [(seed, Path(run_dir))]
    out = {}
    for metric in ("rouge_l", "exact_match"):
        personal = answer_scores(run_dir, final, "personal", metric)
        for other, round_index in (("base", 0), ("content-free", 0)):
            found = brief(difference([(seed, personal, answer_scores(run_dir, round_index, other, metric))]))
            if found:
                out[f"{metric}_vs_{other.replace('-', '_')}"] = found
        found = brief(difference([(seed, answer_scores(run_dir, final, "global", metric),
                                   answer_scores(run_dir, 0, "base", metric))]))
        if found:
            out[f"global_{metric}_vs_base"] = found
    for model, prefix in (("personal", ""), ("global", "global_")):
        mcnemar, docs = knowledge_pairs(one, model)
        if mcnemar:
            out[f"{prefix}probes_vs_base"] = mcnemar_dict(mcnemar)
        if docs:
            out[f"{prefix}doc_loss_vs_base"] = brief(docs)
    return out


def mcnemar_dict(result: McNemar) -> dict:
    return {"items": result.items, "accuracy": result.accuracy_a, "accuracy_base": result.accuracy_b,
            "only_model": result.only_a, "only_base": result.only_b, "p_value": result.p_value}


def learning_curve(run_dir: Path) -> dict[int, dict[str, float]]:
    """ROUGE-L and held-out loss of the personalised models at every evaluated round (the base at
    round 0), all on the learning-curve sample: the examples and documents a curve round evaluates,
    which the full-size rounds' samples contain (nested stratified samples, a prefix of the
    documents). Points measured on different samples would not be comparable. {} without a curve round."""
    root = Path(run_dir) / EVALS_DIR
    rounds = evaluated_rounds(root)
    final = last_round(run_dir)
    curve_rounds = [r for r in rounds if r not in (0, final)]
    if not curve_rounds:
        return {}
    ids = {c: set(answers[0]) for c, answers in answer_scores(run_dir, curve_rounds[0], "personal").items()}
    first = knowledge_items(run_dir, curve_rounds[0], f"personal-client-{min(ids)}") if ids else None
    docs = len((first or {}).get("doc_nll", []))
    out = {}
    for r in rounds:
        model = "base" if r == 0 else "personal"
        scores = answer_scores(run_dir, r, model)
        point = {}
        per_client = [[s for i, s in zip(*scores[c]) if i in ids[c]] for c in sorted(ids) if c in scores]
        if per_client and all(per_client):
            point["rouge_l"] = sum(sum(s) / len(s) for s in per_client) / len(per_client)
        names = ["base"] if r == 0 else [f"personal-client-{c}" for c in sorted(ids)]
        losses = [pooled_loss(items["doc_nll"][:docs]) for items in (knowledge_items(run_dir, r, n) for n in names)
                  if items is not None and docs]
        if losses:
            point["knowledge_loss"] = sum(losses) / len(losses)
        out[r] = point
    return out

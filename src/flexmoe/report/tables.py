"""Markdown tables of runs: one run's clients and rounds, and methods compared over seeds."""

from __future__ import annotations

import json

from flexmoe.analysis.paired import learning_curve
from flexmoe.report.runs import Run, mean_std

# (metrics key, column title, format) of per-client evaluation values, in table order
EVAL_COLUMNS = (
    ("rouge_l", "ROUGE-L", "{:.4f}"),
    ("exact_match", "exact match", "{:.3f}"),
    ("eval_examples", "evaluated", "{:g}"),
    ("rouge_l_global", "ROUGE-L (global model)", "{:.4f}"),
    ("test_loss", "test loss", "{:.4f}"),
    ("knowledge_loss", "knowledge loss", "{:.4f}"),
    ("probe_accuracy", "probe accuracy", "{:.3f}"),
    ("expert_load_std", "expert-load std", "{:.4f}"),
    ("routing_entropy", "routing entropy", "{:.3f}"),
    ("routing_drift", "routing drift", "{:.4f}"),
)


def fmt(value, pattern: str = "{:.4f}") -> str:
    return "n/a" if value is None else pattern.format(value)


def fmt_spread(mu, sd, pattern: str = "{:.4f}") -> str:
    if mu is None:
        return "n/a"
    return pattern.format(mu) if sd is None else f"{pattern.format(mu)} ± {pattern.replace('+', '').format(sd)}"


def table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> list[str]:
    align = align or ["---:"] * len(header)
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|", *("| " + " | ".join(r) + " |" for r in rows)]


def client_table(run: Run) -> list[str]:
    """One row per client at the last evaluation, the base model's ROUGE-L beside it, and bytes."""
    evals = {r["client"]: r for r in run.evals()}
    base = {r["client"]: r for r in run.evals(0)}
    columns = [c for c in EVAL_COLUMNS if any(c[0] in r for r in evals.values())]
    per_client = run.summary.get("per_client", {})
    groups = group_key(run)
    header = ["client", groups, "train", "test", "ROUGE-L (base)", *(title for _, title, _ in columns),
              "bytes up", "bytes down"]
    rows = []
    for client in run.clients:
        cid = client["client_id"]
        record, traffic = evals.get(cid, {}), per_client.get(str(cid), {})
        rows.append([
            str(cid), _names(client.get(groups, [])), str(client.get("num_train", "-")),
            str(client.get("num_test", "-")), fmt(base.get(cid, {}).get("rouge_l")),
            *(fmt(record.get(key), pattern) for key, _, pattern in columns),
            f"{traffic.get('bytes_up', 0):,}", f"{traffic.get('bytes_down', 0):,}",
        ])
    means = [mean_std(r.get(key) for r in evals.values())[0] for key, _, _ in columns]
    rows.append([
        "**mean**", "", "", "", fmt(mean_std(r.get("rouge_l") for r in base.values())[0]),
        *(fmt(m, pattern) for m, (_, _, pattern) in zip(means, columns)),
        f"{run.summary.get('bytes_up', 0):,}", f"{run.summary.get('bytes_down', 0):,}",
    ])
    return table(header, rows, ["---:", "---", *["---:"] * (len(header) - 2)])


def group_key(run: Run) -> str:
    """The client field the partition grouped by: "categories" for data.by = category, else "domains"."""
    return "categories" if run.config.get("data", {}).get("by") == "category" else "domains"


def _names(names: list[str], shown: int = 4) -> str:
    """A client's groups, the first `shown` of them and how many more (a client may hold dozens)."""
    if not names:
        return "-"
    more = f" (+{len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def skipped_lines(run: Run, shown: int = 20) -> list[str]:
    """How many invalid data rows data.skip_invalid left out, and which (the first `shown`)."""
    count = run.summary.get("skipped_rows") or 0
    if not count:
        return []
    errors = run.summary.get("skipped_row_errors", [])
    more = count - min(shown, len(errors))
    return [f"Invalid data rows left out (data.skip_invalid = true): {count}.", "",
            *[f"- {error}" for error in errors[:shown]], *([f"- ... and {more} more"] if more else [])]


def personal_lines(run: Run) -> list[str]:
    """What each client stores of its personal part, as measured on its disk after its last round."""
    per_client = {cid: row["personal_bytes"] for cid, row in run.summary.get("per_client", {}).items()
                  if row.get("personal_bytes")}
    if not per_client:
        return []
    sizes = sorted(set(per_client.values()))
    shown = f"{sizes[0]:,} bytes" if len(sizes) == 1 else f"{sizes[0]:,} to {sizes[-1]:,} bytes"
    graft = run.config.get("flex", {}).get("graft_train", "full") if run.config.get("method", "flex").startswith(
        "flex") else None
    what = {"full": "the grafted copy and its gate", "lora": "the graft's LoRA, gate and selection; the frozen copy is "
            "rebuilt from the base"}.get(graft, "its personal parameters")
    return [f"Personal state stored per client: {shown} ({what}), measured on the client's disk after its last round."]


def truncation_lines(run: Run) -> list[str]:
    """How many training examples were cut to train.max_length, when any were."""
    truncated = sum(client.get("truncated", 0) for client in run.clients)
    unusable = sum(client.get("unusable", 0) for client in run.clients)
    if not truncated and not unusable:
        return []
    total = sum(client.get("num_train", 0) for client in run.clients)
    per_client = ", ".join(f"client {c['client_id']}: {c['truncated']}" for c in run.clients if c.get("truncated"))
    max_length = run.config.get("train", {}).get("max_length")
    return [f"Training examples longer than train.max_length = {max_length} tokens: {truncated} of {total} were cut "
            f"(the context first, then the prompt's middle; the response keeps at least half the room) "
            f"({per_client}); {unusable} were left with no supervised token."]


def grafting_lines(run: Run) -> list[str]:
    """Per MoE layer, the expert each client grafted, with its reconstruction loss beside the median
    and the worst single expert's (the margin that says whether selection matters)."""
    selections = {}
    for path in sorted((run.path / "clients").glob("*/selection.json"), key=lambda p: int(p.parent.name)):
        selections[int(path.parent.name)] = json.loads(path.read_text(encoding="utf-8"))
    if not selections:
        return []
    first = next(iter(selections.values()))
    header = ["layer", *[f"client {c}" for c in selections], "distinct"]
    rows = []
    for index, layer in enumerate(first["layers"]):
        cells, chosen = [], set()
        for selection in selections.values():
            entry = selection["layers"].get(layer, {})
            experts = ",".join(f"e{e}" for e in entry.get("experts", []))
            chosen.add(experts)
            if "median_loss" in entry:
                experts += f" ({fmt(entry['loss'])} / {fmt(entry['median_loss'])} / {fmt(entry['worst_loss'])})"
            cells.append(experts)
        rows.append([str(index), *cells, str(len(chosen))])
    return ["## Grafted experts", "",
            f"Selection: {first.get('strategy')}, k={first.get('k')}; in brackets the reconstruction loss of the "
            "chosen expert(s) / the median / the worst single expert on the client's calibration sample.", "",
            *table(header, rows), ""]


def round_table(run: Run) -> list[str]:
    """Per round: training loss, evaluation means, bytes and cumulative bytes; with a learning curve
    (`eval.every`), the means of every evaluated round on the curve sample, so that they compare."""
    curve = learning_curve(run.path)
    sample = " (curve sample)" if curve else ""
    header = ["round", "train loss", f"mean ROUGE-L{sample}", f"knowledge loss{sample}", "bytes up", "bytes down",
              "cumulative bytes"]
    rows, total = [], 0
    if 0 in curve:
        rows.append(["0 (base)", "", fmt(curve[0].get("rouge_l")), fmt(curve[0].get("knowledge_loss")), "", "", ""])
    for r in run.servers():
        total += r["bytes_up"] + r["bytes_down"]
        point = curve.get(r["round"], {}) if curve else {"rouge_l": r.get("rouge_l_avg"),
                                                          "knowledge_loss": r.get("knowledge_loss")}
        rows.append([str(r["round"]), fmt(r.get("train_loss")), fmt(point.get("rouge_l")),
                     fmt(point.get("knowledge_loss")), f"{r['bytes_up']:,}", f"{r['bytes_down']:,}", f"{total:,}"])
    lines = table(header, rows)
    if curve:
        lines += ["", "Curve sample: at every evaluated round, the examples and held-out documents an intermediate "
                      "round evaluates (`eval.curve_test_examples` per client, the first `eval.curve_docs` "
                      "documents), which the full-size samples contain; the last round's full-size means are in "
                      "the tables above."]
    return lines


def reliability_lines(run: Run) -> list[str]:
    """Failed clients, rejected updates and the privacy spent, when there were any."""
    servers = run.servers()
    failed = sum(len(r.get("failed", [])) for r in servers)
    rejected = sum(len(r.get("rejected", [])) for r in servers)
    lines = []
    if failed or rejected:
        lines.append(f"Client failures skipped: {failed}; updates rejected by the server's validation: {rejected} "
                     "(reasons in metrics.jsonl).")
    epsilon = run.summary.get("dp_epsilon")
    if epsilon is not None:
        privacy = run.config.get("privacy", {})
        lines.append(f"Differential privacy: noise multiplier {privacy.get('noise_multiplier')}, clip norm "
                     f"{privacy.get('clip_norm')}; (ε, δ) = ({epsilon:.3g}, {run.summary.get('dp_delta'):g}) after "
                     f"{run.summary.get('rounds_completed')} rounds (RDP accountant, client level).")
    return lines


def retention_lines(run: Run) -> list[str]:
    """Knowledge retention: the base before training against the models after it."""
    base, last = run.base(), (run.servers() or [{}])[-1]
    lines = []
    pairs = (("knowledge_loss", "held-out LM loss (nats/token, lower is better)", "{:.4f}"),
             ("probe_accuracy", "multiple-choice probe accuracy (higher is better)", "{:.3f}"))
    for key, what, pattern in pairs:
        if base.get(f"{key}_base") is None and last.get(key) is None:
            continue
        text = (f"- {what}: base {fmt(base.get(f'{key}_base'), pattern)} → "
                f"personalised models {fmt(last.get(key), pattern)}")
        if last.get(f"global_{key}") is not None:
            text += f", global model {fmt(last.get(f'global_{key}'), pattern)}"
        lines.append(text)
    return lines


# ---- comparisons ---------------------------------------------------------------------------------
def _final(run: Run, key: str):
    return (run.servers() or [{}])[-1].get(key)


def content_free_lead(groups: dict[str, list[Run]]) -> str | None:
    """The notice a comparison leads with when the content-free answerer (each client's answer template,
    no facts) scores a higher mean ROUGE-L than every trained model, personalised or global: ROUGE-L
    then rewards the format rather than the content, and the report leads with exact match. None otherwise."""
    by_seed = {run.seed: run.base().get("rouge_l_avg_content_free") for runs in groups.values() for run in runs}
    content_free = mean_std(by_seed.values())[0]
    trained = {f"{label}{suffix}": mean_std(_final(run, key) for run in runs)[0]
               for label, runs in groups.items()
               for key, suffix in (("rouge_l_avg", ""), ("rouge_l_global", " (global model)"))}
    trained = {name: value for name, value in trained.items() if value is not None}
    if content_free is None or not trained or content_free <= max(trained.values()):
        return None
    best = max(trained, key=trained.get)
    return (f"**Read exact match first.** The content-free answerer (each client's answer template, no facts) "
            f"scores a higher mean ROUGE-L ({content_free:.4f}) than every trained model (best: {best}, "
            f"{trained[best]:.4f}): on these answers ROUGE-L rewards the answer format, not its content, so this "
            "report leads with exact match (the normalised answer equals the reference) and decides every "
            "comparison on it; ROUGE-L follows.")


def compare_table(groups: dict[str, list[Run]], lead: str = "rouge_l") -> list[str]:
    """Method × (the lead metric's mean and per-client values, the other metric, the global model's ROUGE-L,
    retention, bytes, personal state, time, load std), mean ± spread over seeds."""
    clients = sorted({c["client_id"] for runs in groups.values() for run in runs for c in run.clients})
    means = [("rouge_l_avg", "mean ROUGE-L"), ("exact_match_avg", "mean exact match")]
    if lead == "exact_match":
        means.reverse()
    header = ["method", "seeds", means[0][1], *(f"client {c}" for c in clients), "global model",
              "knowledge loss", "Δ vs base", "probe acc.", "bytes / round", "wall s", "expert-load std", means[1][1],
              "personal bytes / client"]
    rows = []
    for label, runs in groups.items():
        per_client = []
        for cid in clients:
            per_client.append(fmt_spread(*mean_std(
                next((r.get(lead) for r in run.evals() if r["client"] == cid), None) for run in runs)))
        delta = [(_final(run, "knowledge_loss") - run.base()["knowledge_loss_base"])
                 if _final(run, "knowledge_loss") is not None and run.base().get("knowledge_loss_base") is not None
                 else None for run in runs]
        personal = mean_std(run.summary.get("personal_bytes") for run in runs)[0]
        rows.append([
            label, ",".join(str(run.seed) for run in runs),
            fmt_spread(*mean_std(_final(run, means[0][0]) for run in runs)), *per_client,
            fmt_spread(*mean_std(_final(run, "rouge_l_global") for run in runs)),
            fmt_spread(*mean_std(_final(run, "knowledge_loss") for run in runs)),
            fmt_spread(*mean_std(delta), "{:+.4f}"),
            fmt_spread(*mean_std(_final(run, "probe_accuracy") for run in runs), "{:.3f}"),
            f"{mean_std([run.bytes_per_round() for run in runs])[0]:,.0f}",
            fmt_spread(*mean_std(run.summary.get("wall_seconds") for run in runs), "{:.1f}"),
            fmt_spread(*mean_std(_final(run, "expert_load_std") for run in runs)),
            fmt_spread(*mean_std(_final(run, means[1][0]) for run in runs)),
            f"{personal:,.0f}" if personal is not None else "0",
        ])
    return table(header, rows, ["---", "---", *["---:"] * (len(header) - 2)])


def small_test_lines(runs: list[Run]) -> list[str]:
    """The clients (per seed) whose test split is smaller than the evaluation sample `eval.max_test_examples`:
    they are evaluated on their whole, smaller, split."""
    sample = runs[0].config.get("eval", {}).get("max_test_examples", 128) if runs else 0
    by_seed = {}
    for run in runs:
        by_seed.setdefault(run.seed, [f"client {c['client_id']} ({c['num_test']})" for c in run.clients
                                      if c.get("num_test") is not None and c["num_test"] < sample])
    small = {seed: names for seed, names in sorted(by_seed.items()) if names}
    if not small:
        return []
    where = "; ".join(f"seed {seed}: {', '.join(names)}" if len(by_seed) > 1 else ", ".join(names)
                      for seed, names in small.items())
    return [f"Test splits smaller than the evaluation sample (eval.max_test_examples = {sample}), evaluated on "
            f"all of their examples instead (in brackets): {where}. Their means rest on fewer examples."]


def base_table(groups: dict[str, list[Run]]) -> list[str]:
    """The untouched base per seed (identical for every method of a seed: same model, same partitions)."""
    by_seed: dict[int, dict] = {}
    for runs in groups.values():
        for run in runs:
            by_seed.setdefault(run.seed, run.base())
    rows = [[str(seed), fmt(base.get("rouge_l_avg_base")), fmt(base.get("exact_match_avg_base")),
             fmt(base.get("rouge_l_avg_content_free")), fmt(base.get("exact_match_avg_content_free")),
             fmt(base.get("knowledge_loss_base")), fmt(base.get("probe_accuracy_base"), "{:.3f}"),
             fmt(base.get("expert_load_std_base"))]
            for seed, base in sorted(by_seed.items())]
    return table(["seed", "mean ROUGE-L", "exact match", "content-free ROUGE-L", "content-free exact match",
                  "knowledge loss", "probe acc.", "expert-load std"], rows)

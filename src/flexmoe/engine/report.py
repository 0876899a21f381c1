"""The run's `report.md` and `plots/`: per-client ROUGE-L, knowledge loss and bytes."""

from __future__ import annotations

from pathlib import Path

from flexmoe.engine.rundir import write_text_atomic


def write_report(run_dir: Path, summary: dict, records: list[dict], clients: list) -> None:
    """`clients`: `flexmoe.engine.core.ClientInfo` rows (what the server knows of each client)."""
    lines = [
        f"# flexmoe run: {summary['method']}",
        "",
        f"Rounds completed: {summary['rounds_completed']} of {summary['rounds']}; "
        f"{summary['num_clients']} clients; seed {summary['seed']}.",
        "",
        "| client | domains | train | test | ROUGE-L (base) | ROUGE-L | knowledge loss | expert-load std "
        "| routing entropy | bytes up | bytes down |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for client in clients:
        row = summary["per_client"].get(str(client.client_id), {})
        domains = ", ".join(client.domains) or "-"
        lines.append(
            f"| {client.client_id} | {domains} | {client.num_train} | {client.num_test} | "
            f"{_fmt(row.get('rouge_l_base'))} | {_fmt(row.get('rouge_l'))} | {_fmt(row.get('knowledge_loss'))} | {_fmt(row.get('expert_load_std'))} | "
            f"{_fmt(row.get('routing_entropy'))} | {row.get('bytes_up', 0):,} | {row.get('bytes_down', 0):,} |"
        )
    lines += [
        f"| **all** | | | | {_fmt(summary['rouge_l_avg_base'])} | **{_fmt(summary['rouge_l_avg'])}** | **{_fmt(summary['knowledge_loss'])}** | "
        f"{_fmt(summary['expert_load_std'])} | {_fmt(summary['routing_entropy'])} | "
        f"**{summary['bytes_up']:,}** | **{summary['bytes_down']:,}** |",
        "",
        f"Held-out knowledge loss of the untouched base: {_fmt(summary['knowledge_loss_base'])} "
        "(lower is better; a rise after training means forgotten pretraining knowledge).",
        "ROUGE-L: mean F1 of greedy answers on each client's own test split, with its personalised model "
        "(base: the untouched base model). Routing statistics are measured on the held-out corpus.",
        "",
    ]
    if _plot(run_dir, records):
        lines += ["![training loss and ROUGE-L per round](plots/rounds.png)", ""]
    write_text_atomic(run_dir / "report.md", "\n".join(lines))


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _plot(run_dir: Path, records: list[dict]) -> bool:
    servers = [r for r in records if r["kind"] == "server" and r["round"] > 0]
    if not servers:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, rouge_ax) = plt.subplots(1, 2, figsize=(9, 3.2))
    loss_ax.plot([r["round"] for r in servers], [r["train_loss"] for r in servers], marker="o")
    loss_ax.set(xlabel="round", ylabel="train loss (response tokens)")
    evaluated = [r for r in servers if "rouge_l_avg" in r]
    rouge_ax.plot([r["round"] for r in evaluated], [r["rouge_l_avg"] for r in evaluated], marker="o", color="C1")
    rouge_ax.set(xlabel="round", ylabel="mean personalised ROUGE-L")
    fig.tight_layout()
    path = run_dir / "plots" / "rounds.png"
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name("rounds.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return True

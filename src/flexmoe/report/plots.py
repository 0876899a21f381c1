"""PNG plots (matplotlib, Agg backend: no display needed), each written atomically."""

from __future__ import annotations

import math
from pathlib import Path

from flexmoe.files import write_atomic
from flexmoe.report.runs import Run, mean_std


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, path: Path) -> None:
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


def _save(fig, path: Path) -> str:
    plt = _pyplot()
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
    return path.name


def run_rounds(run: Run, path: Path) -> str | None:
    """Training loss, mean personalised ROUGE-L and knowledge loss per round of one run."""
    servers = run.servers()
    if not servers:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    axes[0].plot([r["round"] for r in servers], [r["train_loss"] for r in servers], marker="o")
    axes[0].set(xlabel="round", ylabel="train loss (response tokens)")
    for ax, key, label in ((axes[1], "rouge_l_avg", "mean personalised ROUGE-L"),
                           (axes[2], "knowledge_loss", "held-out knowledge loss")):
        points = [(r["round"], r[key]) for r in servers if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker="o", color="C1", label=run.label)
        base = run.base().get(f"{key}_base")
        if base is not None:
            ax.axhline(base, color="grey", linestyle="--", label="base model")
            ax.legend(fontsize=7)
        ax.set(xlabel="round", ylabel=label)
    return _save(fig, path)


def run_bytes(run: Run, path: Path) -> str | None:
    """Cumulative bytes up and down per round of one run."""
    servers = run.servers()
    if not servers or not any(r["bytes_up"] or r["bytes_down"] for r in servers):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    rounds = [r["round"] for r in servers]
    for key, color in (("bytes_up", "C0"), ("bytes_down", "C2")):
        total, cumulative = 0, []
        for r in servers:
            total += r[key]
            cumulative.append(total / 1e6)
        ax.plot(rounds, cumulative, marker="o", color=color, label=key.replace("_", " "))
    ax.set(xlabel="round", ylabel="cumulative MB (all clients)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def expert_load_heatmaps(panels: list[tuple[str, dict[str, list[float]]]], path: Path, title: str = "") -> str | None:
    """One heatmap per panel (a client, or the base): MoE layers × experts, each cell the expert's
    share of its layer's selections on the held-out corpus."""
    panels = [(name, load) for name, load in panels if load]
    if not panels:
        return None
    plt = _pyplot()
    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns + 1, 2.4 * rows + 0.6), squeeze=False,
                             layout="constrained")
    vmax = max(max(max(v) for v in load.values()) for _, load in panels)
    image = None
    for ax, (name, load) in zip(axes.flat, panels):
        image = ax.imshow([load[layer] for layer in load], aspect="auto", cmap="viridis", vmin=0, vmax=vmax,
                          interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.set_xticks(range(len(next(iter(load.values())))))
        ax.set_yticks(range(len(load)))
        ax.tick_params(labelsize=6)
        ax.set_xlabel("expert", fontsize=7)
        ax.set_ylabel("MoE layer", fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, shrink=0.8, label="load share")
    if title:
        fig.suptitle(title, fontsize=9)
    _save_png(fig, path)
    plt.close(fig)
    return path.name


def compare_rounds(groups: dict[str, list[Run]], key: str, ylabel: str, path: Path) -> str | None:
    """`key` of the server records per round, one line per method: mean over seeds, bars = spread."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    drawn = False
    for index, (label, runs) in enumerate(groups.items()):
        by_round: dict[int, list[float]] = {}
        for run in runs:
            for r in run.servers():
                if r.get(key) is not None:
                    by_round.setdefault(r["round"], []).append(r[key])
        if not by_round:
            continue
        rounds = sorted(by_round)
        stats = [mean_std(by_round[n]) for n in rounds]
        ax.errorbar(rounds, [m for m, _ in stats], yerr=[s or 0.0 for _, s in stats], marker="o", capsize=2,
                    label=label, color=f"C{index % 10}", linestyle="-" if index < 10 else "--")
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(xlabel="round", ylabel=ylabel)
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def compare_bytes(groups: dict[str, list[Run]], path: Path) -> str | None:
    """Mean bytes per round (up + down, all clients) per method, log scale."""
    labels = [label for label, runs in groups.items() if any(run.bytes_per_round() for run in runs)]
    if not labels:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(labels) + 2), 3.4))
    values = [mean_std([run.bytes_per_round() for run in groups[label]])[0] / 1e6 for label in labels]
    ax.bar(range(len(labels)), values, color="C0")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
    ax.set(ylabel="MB per round (up + down)", yscale="log")
    return _save(fig, path)

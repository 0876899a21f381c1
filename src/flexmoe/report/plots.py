"""PNG plots (matplotlib, Agg backend: no display needed), each written atomically."""

from __future__ import annotations

import math
from pathlib import Path

from flexmoe.analysis.paired import learning_curve
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


def _round_axis(ax, rounds: int | None = None) -> None:
    """Integer round ticks, the whole run's span when known (one evaluated round is not a lone dot
    on a cramped axis), and plain numbers on the value axis (no offset like "+2.46")."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if rounds:
        ax.set_xlim(-0.5, rounds + 0.5)
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax.set_xlabel("round")


def _with_base(points: list[tuple[int, float]], base: float | None) -> list[tuple[int, float]]:
    """The base model's value as round 0 ahead of the run's own points (what every round starts from)."""
    return ([(0, base)] if base is not None else []) + [(n, v) for n, v in points if n > 0]


def _total_rounds(run: Run) -> int | None:
    rounds = run.config.get("rounds")
    return int(rounds) if isinstance(rounds, int) else None


def run_rounds(run: Run, path: Path) -> str | None:
    """Training loss, mean personalised ROUGE-L and knowledge loss per round of one run, each
    evaluation panel starting at the base model's value (round 0, also drawn as a reference line)."""
    servers = run.servers()
    if not servers:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    axes[0].plot([r["round"] for r in servers], [r["train_loss"] for r in servers], marker="o")
    axes[0].set(ylabel="train loss (response tokens)")
    curve = learning_curve(run.path)  # comparable points: every round on the learning-curve sample
    for ax, key, label in ((axes[1], "rouge_l_avg", "mean personalised ROUGE-L"),
                           (axes[2], "knowledge_loss", "held-out knowledge loss")):
        if curve:
            name = key.removesuffix("_avg")
            base = curve.get(0, {}).get(name)
            points = [(r, p[name]) for r, p in sorted(curve.items()) if p.get(name) is not None]
            label = {"rouge_l": "personalised ROUGE-L", "knowledge_loss": "knowledge loss"}[name] + " (curve sample)"
        else:
            base = run.base().get(f"{key}_base")
            points = _with_base([(r["round"], r[key]) for r in servers if r.get(key) is not None], base)
        if points:
            ax.plot(*zip(*points), marker="o", color="C1", label=run.label)
        if base is not None:
            ax.axhline(base, color="grey", linestyle="--", linewidth=1, label="base model")
        if points or base is not None:
            ax.legend(fontsize=7)
        ax.set(ylabel=label)
    for ax in axes:
        _round_axis(ax, _total_rounds(run))
    return _save(fig, path)


def run_clients(run: Run, path: Path) -> str | None:
    """Per-client learning curves: local training loss per round, and personalised ROUGE-L per
    evaluated round starting from the base model's score on the client's test split (round 0)."""
    trains = [r for r in run.records if r["kind"] == "train"]
    evals = [r for r in run.records if r["kind"] == "eval"]
    if not trains and not evals:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    clients = sorted({r["client"] for r in trains + evals})
    for index, client in enumerate(clients):
        style = {"color": f"C{index % 10}", "marker": "o", "markersize": 4,
                 "linestyle": "-" if index < 10 else "--", "label": f"client {client}"}
        train = sorted((r["round"], r["loss"]) for r in trains if r["client"] == client and r.get("loss") is not None)
        if train:
            axes[0].plot(*zip(*train), **style)
        scores = sorted((r["round"], r["rouge_l"]) for r in evals
                        if r["client"] == client and r.get("rouge_l") is not None)
        if scores:
            axes[1].plot(*zip(*scores), **style)
    axes[0].set(ylabel="local train loss (response tokens)")
    axes[1].set(ylabel="personalised ROUGE-L (round 0: base)")
    for ax in axes:
        _round_axis(ax, _total_rounds(run))
        if ax.lines:
            ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def run_bytes(run: Run, path: Path) -> str | None:
    """Bytes up and down per round (side by side) and cumulated, of one run."""
    servers = run.servers()
    if not servers or not any(r["bytes_up"] or r["bytes_down"] for r in servers):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    rounds = [r["round"] for r in servers]
    width = 0.38
    directions = (("bytes_up", "up (clients → server)", "C0", "-", "o", -width / 2),
                  ("bytes_down", "down (server → clients)", "C2", "--", "s", width / 2))
    for key, label, color, linestyle, marker, shift in directions:
        per_round = [r[key] / 1e6 for r in servers]
        axes[0].bar([n + shift for n in rounds], per_round, width=width, color=color, label=label)
        cumulative = [sum(per_round[: i + 1]) for i in range(len(per_round))]
        # up and down are often nearly equal: a wide pale line under a thin dashed one keeps both visible
        wide = key == "bytes_up"
        axes[1].plot(rounds, cumulative, color=color, linestyle=linestyle, marker=marker, markerfacecolor="none",
                     markersize=8 if wide else 5, linewidth=4 if wide else 1.2, alpha=0.5 if wide else 1.0,
                     label=label)
    axes[0].set(ylabel="MB per round (all clients)")
    axes[1].set(ylabel="cumulative MB (all clients)")
    for ax in axes:
        _round_axis(ax, _total_rounds(run))
        ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # headroom: the legend never hides a bar
        ax.legend(fontsize=7, loc="upper left")
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
    """`key` of the server records per round, one line per method: mean over seeds, bars = spread;
    evaluation measures start at the base model's value (round 0), also drawn as a reference line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    drawn = False
    bases = [run.base().get(f"{key}_base") for runs in groups.values() for run in runs]
    base = mean_std(bases)[0] if bases and all(b is not None for b in bases) else None
    for index, (label, runs) in enumerate(groups.items()):
        by_round: dict[int, list[float]] = {}
        for run in runs:
            for r in run.servers():
                if r.get(key) is not None:
                    by_round.setdefault(r["round"], []).append(r[key])
        if not by_round:
            continue
        if base is not None:
            by_round[0] = [b for b in (run.base().get(f"{key}_base") for run in runs) if b is not None]
        rounds = sorted(by_round)
        stats = [mean_std(by_round[n]) for n in rounds]
        ax.errorbar(rounds, [m for m, _ in stats], yerr=[s or 0.0 for _, s in stats], marker="o", capsize=2,
                    label=label, color=f"C{index % 10}", linestyle="-" if index < 10 else "--")
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    if base is not None:
        ax.axhline(base, color="grey", linestyle=":", linewidth=1, label="base model (mean over seeds)")
    rounds = [run.config.get("rounds") for runs in groups.values() for run in runs]
    _round_axis(ax, max(rounds) if all(isinstance(n, int) for n in rounds) else None)
    ax.set(ylabel=ylabel)
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def compare_bytes(groups: dict[str, list[Run]], path: Path) -> str | None:
    """Mean bytes per round up and down (all clients), side by side per method, log scale."""
    labels = [label for label, runs in groups.items() if any(run.bytes_per_round() for run in runs)]
    if not labels:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(labels) + 2), 3.4))
    width, smallest, largest = 0.38, math.inf, 0.0
    for key, label, color, shift in (("bytes_up", "up", "C0", -width / 2), ("bytes_down", "down", "C2", width / 2)):
        values = [mean_std([_per_round(run, key) for run in groups[name]])[0] / 1e6 for name in labels]
        ax.bar([i + shift for i in range(len(labels))], values, width=width, color=color, label=label)
        smallest = min([smallest, *(v for v in values if v > 0)])
        largest = max([largest, *values])
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
    ax.set(ylabel="MB per round (all clients)", yscale="log")
    ax.set_ylim(smallest / 10, largest * 4)  # a log axis has no zero: bars start a decade below the smallest
    ax.legend(fontsize=7)
    return _save(fig, path)


def _per_round(run: Run, key: str) -> float:
    servers = run.servers()
    return sum(r[key] for r in servers) / len(servers) if servers else 0.0

"""PNG figures of an exploration: each SLO statistic against the request rate for the top
candidates, and the cost-latency frontier. Every figure names the store generation, the SLO and,
per line, the platform, backend, TP degree and settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dooly.explore.report import coverage_label
from dooly.sim.plots import _pyplot

CAPACITY_FILE = "capacity.png"
FRONTIER_FILE = "frontier.png"
PANEL_WIDTH = 5.5
PANEL_HEIGHT = 5.0
FRONTIER_SIZE = (8.0, 5.0)
DPI = 90
MS_PER_S = 1e3
TOP_PLOTTED = 6
LEGEND_FONT = 6
LABEL_FONT = 6
LEGEND_SPACE = 0.22  # share of the capacity figure's height kept below the panels for the legend
KEY_LINE_SPACE = 0.025  # share of the frontier figure's height per line of its rank key


def _title(document: dict[str, Any]) -> str:
    slo = ", ".join(f"{s['name']}<={s['limit_s'] * MS_PER_S:g}ms" for s in document["slo"])
    return f"{', '.join(m.rsplit('/', 1)[-1] for m in document['models'])}; store gen {document['generation']}; SLO {slo}"


def plot_capacity(document: dict[str, Any], directory: Path) -> Path:
    """Latency statistic vs rate of the TOP_PLOTTED best candidates, one panel per SLO."""
    plt = _pyplot()
    slos = document["slo"]
    fig, axes = plt.subplots(1, len(slos), figsize=(PANEL_WIDTH * len(slos), PANEL_HEIGHT), squeeze=False)
    top = [r for r in document["candidates"] if r.get("rank")][:TOP_PLOTTED]
    for ax, slo in zip(axes[0], slos):
        for r in top:
            pts = [p for p in r["points"] if p["slo_values_s"].get(slo["name"]) is not None]
            ax.plot([p["rate_rps"] for p in pts], [p["slo_values_s"][slo["name"]] * MS_PER_S for p in pts],
                    marker="o", markersize=3, label=f"#{r['rank']} {r['label']} [{coverage_label(r.get('coverage', {}))}]")
        ax.axhline(slo["limit_s"] * MS_PER_S, color="black", linestyle="--", linewidth=0.8, label="SLO")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(f"{slo['name']} (ms)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=LEGEND_FONT, frameon=False)
    fig.suptitle(_title(document), fontsize=8)
    fig.tight_layout(rect=(0, LEGEND_SPACE, 1, 1))
    path = directory / CAPACITY_FILE
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_frontier(document: dict[str, Any], directory: Path) -> Path:
    """Every operating point that met the SLO (faint) and the Pareto frontier, each frontier point
    marked with its candidate's rank in the table; the key below names the ranked candidates (full
    labels beside the points overlap where the frontier is dense)."""
    plt = _pyplot()
    front = document["frontier"]
    ranks = {r["label"]: r["rank"] for r in document["candidates"] if r.get("rank")}
    fig, ax = plt.subplots(figsize=FRONTIER_SIZE)
    named: dict[int, str] = {}
    for model, found in front["models"].items():
        every, points = found["all_points"], found["points"]
        short = model.rsplit("/", 1)[-1]
        dots = ax.scatter([p["cost"] for p in every], [p["latency_s"] * MS_PER_S for p in every], s=8, alpha=0.4,
                          label=f"{short}: operating points meeting the SLO")
        ax.plot([p["cost"] for p in points], [p["latency_s"] * MS_PER_S for p in points], marker="o",
                color=dots.get_facecolor()[0][:3], label=f"{short}: Pareto frontier")
        for p in points:
            rank = ranks.get(p["label"])
            tag = f"#{rank}" if rank is not None else p["label"]
            if rank is not None:
                named[rank] = p["label"]
            ax.annotate(f"{tag} @ {p['rate_rps']:.2g}/s", (p["cost"], p["latency_s"] * MS_PER_S),
                        fontsize=LABEL_FONT, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(front["cost_unit"] + (" (EXAMPLE prices)" if document["prices"]["example"] else ""))
    ax.set_ylabel(f"{front['latency']} (ms)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=LEGEND_FONT)
    ax.set_title(_title(document), fontsize=8)
    key = "\n".join(f"#{rank} {label}" for rank, label in sorted(named.items()))
    fig.text(0.01, 0.01, key, fontsize=LEGEND_FONT, va="bottom", ha="left")
    fig.tight_layout(rect=(0, KEY_LINE_SPACE * len(named), 1, 1))
    path = directory / FRONTIER_FILE
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path

"""PNG charts of a simulation or a validation (matplotlib, Agg backend, imported only here)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dooly.errors import DoolyError

if TYPE_CHECKING:
    from dooly.sim.simulator import SimResult

logger = logging.getLogger(__name__)

FIGURE_SIZE = (7.0, 4.5)
PANEL_SIZE = 4.5
DPI = 110
SCATTER_POINT_SIZE = 6
SCATTER_ALPHA = 0.5


def _pyplot():
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise DoolyError("plots need matplotlib: pip install 'dooly[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_simulation(result: SimResult, directory: str | Path) -> list[Path]:
    """Latency CDFs (TTFT, TPOT, E2E) and batch size over time; returns the files written."""
    plt = _pyplot()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    finished = [r for r in result.requests if not np.isnan(r.finish_s)]
    for name, values in (
        ("ttft", [r.ttft_s for r in finished]),
        ("tpot", [r.tpot_s for r in finished]),
        ("e2e", [r.e2e_s for r in finished]),
    ):
        data = np.sort(np.asarray([v for v in values if not np.isnan(v)]))
        fig, ax = plt.subplots(figsize=FIGURE_SIZE)
        if data.size:
            ax.plot(data, np.arange(1, data.size + 1) / data.size)
        ax.set_xlabel(f"{name.upper()} (s)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{name.upper()} CDF ({data.size} requests)")
        ax.grid(True, alpha=0.3)
        written.append(_save(fig, plt, directory / f"{name}_cdf.png"))
    fig, ax = plt.subplots(figsize=FIGURE_SIZE)
    start = result.step_column("start_s")
    ax.plot(start, result.step_column("num_decode_seqs"), label="decode sequences", linewidth=0.8)
    ax.plot(start, result.step_column("num_prefill_seqs"), label="prefill sequences", linewidth=0.8)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("sequences in the step")
    ax.set_title("batch size over time")
    ax.legend()
    ax.grid(True, alpha=0.3)
    written.append(_save(fig, plt, directory / "batch_size.png"))
    return written


def scatter_panels(panels: list[tuple[str, Any]], path: Path) -> Path:
    """One predicted-vs-measured panel per (label, ErrorStats), log-log with the y = x line."""
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(panels), figsize=(PANEL_SIZE * len(panels), PANEL_SIZE), squeeze=False)
    for ax, (label, stats) in zip(axes[0], panels):
        measured, predicted = stats.measured, stats.predicted
        if measured.size:
            ax.scatter(measured, predicted, s=SCATTER_POINT_SIZE, alpha=SCATTER_ALPHA)
            low = float(min(measured.min(), predicted.min()))
            high = float(max(measured.max(), predicted.max()))
            ax.plot([low, high], [low, high], color="black", linewidth=0.8)
            if low > 0:
                ax.set_xscale("log")
                ax.set_yscale("log")
            ax.set_title(f"{label}: MAPE {stats.ape.mean():.1f}% (n={measured.size})")
        else:
            ax.set_title(f"{label}: no data")
        ax.set_xlabel("measured")
        ax.set_ylabel("predicted")
        ax.grid(True, alpha=0.3)
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    logger.info("wrote %s", path)
    return path

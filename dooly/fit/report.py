"""What `dooly fit` reports: per-group, per-class held-out errors, the error over every profiled
signature, the leave-one-model-out check, and the text `dooly fit` prints.

Kept apart from fitting so that the report's shape (also what meta.json records) is read in one
place; nothing here fits or loads a model.
"""

from __future__ import annotations

import platform as platform_module
from dataclasses import dataclass
from typing import Any

import numpy as np

from dooly import __version__
from dooly.output import format_table

PERCENTILE_P90 = 90
NONE_CELL = "-"
CLASS_HEADERS = (
    "op class",
    "points",
    "sigs",
    "seen method",
    "seen MAPE med",
    "seen p90",
    "unseen method",
    "unseen MAPE med",
    "unseen p90",
)
LOMO_HEADERS = ("model", "group", "ops", "points", "LOMO MAPE med", "LOMO p90", "in-sample med", "uncovered")


def summarize(mape: np.ndarray) -> tuple[float | None, float | None]:
    """(median, p90) of per-op errors; (None, None) when there is none."""
    if len(mape) == 0:
        return None, None
    return float(np.median(mape)), float(np.percentile(mape, PERCENTILE_P90))


def validation_text(folds: int, repeats: int) -> str:
    """The held-out protocol, as reports state it."""
    again = f", repeated {repeats} times over different random folds" if repeats > 1 else ""
    return (
        f"{folds}-fold cross-validation{again} (seen: folds of each signature's points; unseen: "
        f"folds of whole signatures)"
    )


def library_versions() -> dict[str, str]:
    """Versions of the writer, recorded in meta.json for provenance: a reader does not check them
    (models are stored as data, see codec.py), so another scikit-learn reads them alike."""
    import sklearn

    return {
        "dooly": __version__,
        "scikit-learn": sklearn.__version__,
        "numpy": np.__version__,
        "python": platform_module.python_version(),
    }


@dataclass
class FitReport:
    """What `dooly fit` did: per-group, per-class errors, the error over every profiled
    signature, and the leave-one-model-out check."""

    generation: int
    folds: int
    groups: list[dict[str, Any]]
    lomo: list[dict[str, Any]]
    versions: dict[str, str]
    repeats: int
    meta_key: str = ""

    @property
    def overall(self) -> dict[str, Any]:
        """Held-out per-op MAPE over every profiled signature of every group (each counted once:
        backend-independent ops live in the shared group), with the seen models fitted."""
        errors = np.array(
            [
                value
                for group in self.groups
                for row in group["classes"]
                for value in row.get("seen_mape_by_signature", {}).values()
            ]
        )
        median, p90 = summarize(errors)
        return {"signatures": int(len(errors)), "seen_mape_median_pct": median, "seen_mape_p90_pct": p90}

    def to_dict(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "folds": self.folds,
            "repeats": self.repeats,
            "validation": validation_text(self.folds, self.repeats),
            "overall": self.overall,
            "groups": self.groups,
            "leave_one_model_out": self.lomo,
            "versions": self.versions,
            "meta_key": self.meta_key,
        }


def _pct(value: float | None) -> str:
    return NONE_CELL if value is None else f"{value:.2f}%"


def report_text(report: FitReport) -> str:
    """The text `dooly fit` prints: per-group class tables, the overall error, the held-out
    protocol in one line, and the leave-one-model-out table."""
    lines: list[str] = []
    for group in report.groups:
        lines.append(f"{group['platform']} / {group['engine']} / {group['backend']} / {group['dtype']}")
        rows = [
            (
                c["op_class"],
                c["points"],
                c["signatures"],
                c["seen_method"],
                _pct(c["seen_mape_median_pct"]),
                _pct(c["seen_mape_p90_pct"]),
                c["unseen_method"],
                _pct(c["unseen_mape_median_pct"]),
                _pct(c["unseen_mape_p90_pct"]),
            )
            for c in group["classes"]
        ]
        lines += [format_table(CLASS_HEADERS, rows), ""]
    overall = report.overall
    lines.append(
        f"all profiled signatures ({overall['signatures']}): seen MAPE median "
        f"{_pct(overall['seen_mape_median_pct'])}, p90 {_pct(overall['seen_mape_p90_pct'])}"
    )
    lines.append(
        f"held-out error: {validation_text(report.folds, report.repeats)}; per-op MAPE = mean over "
        f"an op's held-out points; median and p90 over ops (see `dooly fit --help`)"
    )
    if report.lomo:
        lomo_rows = [
            (
                r["model_id"],
                f"{r['platform']}/{r['backend']}/{r['dtype']}",
                r["ops_predicted"],
                r["points"],
                _pct(r["lomo_mape_median_pct"]),
                _pct(r["lomo_mape_p90_pct"]),
                _pct(r["in_sample_mape_median_pct"]),
                r["ops_uncovered"],
            )
            for r in report.lomo
        ]
        lines += [
            "",
            "leave one model out (its signatures removed from training):",
            format_table(LOMO_HEADERS, lomo_rows),
        ]
    else:
        lines += ["", "leave one model out: no inventories in the store (inventories/<model_key>.json)"]
    lines.append(f"\nmodels of generation {report.generation} written: {report.meta_key}")
    return "\n".join(lines)

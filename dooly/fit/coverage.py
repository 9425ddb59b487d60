"""Coverage as part of every answer: how much of a prediction is measured, and what is estimated.

`dooly predict` and `dooly simulate` report, per phase of the steps they priced, the share of
predicted device time from measured signatures, class regressors (a signature never measured,
its class measured) and the family fallback (a class never measured on the platform), and list
the estimated operations with their share. `--require-measured` turns any estimate into exit
code 2 with the list, and names the `dooly plan` command that prices closing the gaps.

Apart from those shares (a measured signature can be priced beyond its measured sizes): the share
of device time that measured operations spend in steps whose sizes exceed the largest they were
measured at (dooly.fit.extent), one line per phase where there is any; where the step's token count
is what exceeds, the line names the `dooly plan --token-budget` that measures steps of that size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import click

from dooly.errors import DoolyError

if TYPE_CHECKING:
    from dooly.fit.predictor import Coverage, StepPredictor
    from dooly.fit.source import FittedSource

PERCENT = 100.0
# How many estimated operations the text output lists per phase (JSON lists them all).
TEXT_ESTIMATED_ROWS = 8
# How many estimated operations the one-line --require-measured error names.
ERROR_ESTIMATED_NAMES = 6
SIGNATURE_CHARS = 12
# How each checked variable reads in the extrapolation line.
VARIABLE_WORDS = {
    "T": "tokens",
    "B": "sequences",
    "K": "KV tokens",
    "D": "decodes",
    "S": "KV tokens read",
    "L": "longest sequence's KV",
}


def require_measured_option(func: Any) -> Any:
    """The `--require-measured` flag of the commands that predict."""
    return click.option(
        "--require-measured",
        is_flag=True,
        help="Fail (exit 2, with the list) when any operation's latency is estimated rather than measured; "
        "`dooly plan` prices profiling them.",
    )(func)


def check_measured(step: StepPredictor, model: str, source: FittedSource) -> None:
    """One error line naming the estimated operations of STEP, if there are any."""
    from dooly.fit.predictor import SOURCE_MEASURED

    estimated = [
        (m.op_class, m.signature, src) for m, _, src in step.entries if src != SOURCE_MEASURED
    ]
    if not estimated:
        return
    estimated.sort()
    names = ", ".join(f"{cls}[{sig[:SIGNATURE_CHARS]}] ({src})" for cls, sig, src in estimated[:ERROR_ESTIMATED_NAMES])
    more = f" and {len(estimated) - ERROR_ESTIMATED_NAMES} more" if len(estimated) > ERROR_ESTIMATED_NAMES else ""
    raise DoolyError(
        f"--require-measured: {len(estimated)} of {step.op_count} operations of {model} are estimated on "
        f"{source.describe()}: {names}{more}; `{plan_command(model, source.store, source.platform, source.backend)}` "
        f"prices profiling them"
    )


def plan_command(model: str, store: str | None, platform: str | None, backend: str | None) -> str:
    """The `dooly plan` command that prices measuring what a prediction of MODEL lacks."""
    return f"dooly plan {model} --store {store} --platform '{platform}' --attention '{backend}'"


def coverage_payload(by_phase: Mapping[str, Coverage]) -> dict[str, Any]:
    """The JSON form: per phase, shares by source and every estimated operation."""
    return {phase: coverage.to_dict() for phase, coverage in by_phase.items()}


def payload_lines(payload: Mapping[str, Mapping[str, Any]], plan: str = "") -> list[str]:
    """The text form of a coverage payload (`coverage_payload`, as a validate report holds it);
    `plan` is the `dooly plan` command of the prediction (`plan_command`), for the hint."""
    lines = []
    for phase, c in payload.items():
        lines.append(
            f"coverage {phase}: {PERCENT * c['measured_share']:.1f}% of predicted device time measured, "
            f"{PERCENT * c['class_regressor_share']:.1f}% class regressor, {PERCENT * c['fallback_share']:.1f}% fallback"
        )
        lines += _extrapolated_lines(c, plan)
        for estimated in c["estimated"][:TEXT_ESTIMATED_ROWS]:
            lines.append(
                f"  {PERCENT * estimated['share']:5.1f}%  {estimated['op_class']} "
                f"[{estimated['signature'][:SIGNATURE_CHARS]}] {estimated['source']} ({estimated['method']})"
            )
    return lines


def coverage_lines(by_phase: Mapping[str, Coverage], origin: str = "", plan: str = "") -> list[str]:
    """The text form: one line per phase, its extrapolation where there is any, then its largest
    estimated operations; `plan` as in `payload_lines`."""
    from dooly.fit.predictor import SOURCE_CLASS, SOURCE_FALLBACK

    lines = []
    if origin:
        lines.append(f"inventory: {origin}")
    for phase, coverage in by_phase.items():
        lines.append(
            f"coverage {phase}: {PERCENT * coverage.measured_share:.1f}% of predicted device time measured, "
            f"{PERCENT * coverage.share(SOURCE_CLASS):.1f}% class regressor, "
            f"{PERCENT * coverage.share(SOURCE_FALLBACK):.1f}% fallback"
        )
        if coverage.extrapolated:
            lines += _extrapolated_lines(coverage.to_dict(), plan)
        total = coverage.seconds
        for estimated in coverage.estimated[:TEXT_ESTIMATED_ROWS]:
            share = estimated.seconds / total if total > 0 else 0.0
            lines.append(
                f"  {PERCENT * share:5.1f}%  {estimated.op_class} [{estimated.signature[:SIGNATURE_CHARS]}] "
                f"{estimated.source} ({estimated.method})"
            )
        if len(coverage.estimated) > TEXT_ESTIMATED_ROWS:
            lines.append(f"  ... and {len(coverage.estimated) - TEXT_ESTIMATED_ROWS} more estimated (--output json lists all)")
    return lines


def _extrapolated_lines(phase: Mapping[str, Any], plan: str) -> list[str]:
    """The phase's extrapolation line, none when nothing is priced beyond measured sizes (or it
    cannot be told). It names the variable that carries most of that time, at the operation
    measured least far in it: how far the steps go beyond the grid."""
    share = phase.get("extrapolated_share")
    entries = phase.get("extrapolated") or []
    if not share or not entries:
        return []
    by_variable: dict[str, float] = {}
    for entry in entries:
        by_variable[entry["variable"]] = by_variable.get(entry["variable"], 0.0) + entry["share"]
    variable = max(by_variable, key=lambda var: by_variable[var])
    named = [entry for entry in entries if entry["variable"] == variable]
    worst = min(named, key=lambda entry: (entry["measured_max"], -entry["share"]))
    needed = max(entry["needed_max"] for entry in named)
    others = len(entries) - 1
    more = f"; {others} more operation{'s' if others != 1 else ''}, --output json lists them" if others else ""
    line = (
        f"  extrapolated: {PERCENT * share:.1f}% of predicted device time at sizes beyond those measured "
        f"({variable} ({VARIABLE_WORDS.get(variable, variable)}) up to {needed}; measured up to "
        f"{worst['measured_max']} for {worst['op_class']} [{worst['signature'][:SIGNATURE_CHARS]}]{more})"
    )
    budget = phase.get("token_budget_needed")
    if budget:
        command = plan or "dooly plan MODEL ..."
        line += f"; `{command} --token-budget {budget}` measures steps of that many tokens"
    return [line]

"""Coverage as part of every answer: how much of a prediction is measured, and what is estimated.

`dooly predict` and `dooly simulate` report, per phase of the steps they priced, the share of
predicted device time from measured signatures, class regressors (a signature never measured,
its class measured) and the family fallback (a class never measured on the platform), and list
the estimated operations with their share. `--require-measured` turns any estimate into exit
code 2 with the list, and names the `dooly plan` command that prices closing the gaps.

Apart from those shares (a measured signature can be priced beyond its measured sizes): the share
of device time that measured operations spend in steps whose sizes exceed the largest they were
measured at (dooly.fit.extent), one line per phase where there is any; where the step's token count,
longest sequence or KV total is what exceeds, the line names the `dooly plan` flags that measure
steps of those sizes (`--token-budget`, `--context`, `--max-kv`; `plan_flags`).
"""

from __future__ import annotations

import functools
import math
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
# The `--context` a hint names is the longest sequence's KV the steps needed rounded up to a
# multiple of this: runs whose prompts reach nearby lengths name the same plan.
CONTEXT_STEP = 1024
# Distinct (phase, sizes needed) whose plan flags are kept: explore prices many candidates' coverage.
PLAN_FLAGS_CACHE = 256


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
    """The JSON form: per phase, shares by source, every estimated operation, and the `dooly plan`
    flags that measure its extrapolated sizes (`plan_flags`)."""
    payload = {}
    for phase, coverage in by_phase.items():
        payload[phase] = coverage.to_dict()
        payload[phase]["plan_flags"] = plan_flags(phase, payload[phase])
    return payload


def plan_flags(phase: str, coverage: Mapping[str, Any]) -> list[str]:
    """The `dooly plan` flags (each "--flag VALUE") whose points hold the sizes at which PHASE's
    steps were priced beyond those measured, from its payload (`coverage_payload`; one written
    before `context_needed` and `kv_needed` were recorded gives the token budget only).

    `--token-budget T` for a step token count; `--context N` for the longest sequence's KV (L),
    N rounded up to CONTEXT_STEP, unless the default grid widened by the budget already holds a
    sequence that long in a batch of the phase's regime; `--max-kv V` for the KV total, V the
    smallest at which the default grid widened by the flags before it holds a batch of the regime
    reading that much (`grid.kv_limit_reaching`), unless it does at its default limit or no batch
    of the regime reads that much at any. A phase that is no batch regime (explore's total over
    all steps) is checked against batches of any regime."""
    return list(_plan_flags(phase, coverage.get("token_budget_needed"), coverage.get("context_needed"),
                            coverage.get("kv_needed")))


@functools.lru_cache(maxsize=PLAN_FLAGS_CACHE)
def _plan_flags(phase: str, budget: int | None, context: int | None, kv: int | None) -> tuple[str, ...]:
    from dooly.profile.grid import REGIMES, GridSpec, kv_limit_reaching, longest_kv, widen

    regime = phase if phase in REGIMES else None
    budgets = (budget,) if budget else ()
    grid = widen(GridSpec(), budgets)
    flags = [f"--token-budget {value}" for value in budgets]
    if context and context > longest_kv(grid, regime):
        rounded = CONTEXT_STEP * math.ceil(context / CONTEXT_STEP)
        grid = widen(grid, contexts=(rounded,))
        flags.append(f"--context {rounded}")
    if kv:
        limit = kv_limit_reaching(kv, regime, grid)
        if limit is not None and limit > grid.max_kv:
            flags.append(f"--max-kv {limit}")
    return tuple(flags)


def payload_lines(payload: Mapping[str, Mapping[str, Any]], plan: str = "") -> list[str]:
    """The text form of a coverage payload (`coverage_payload`, as a validate report holds it);
    `plan` is the `dooly plan` command of the prediction (`plan_command`), for the hint."""
    lines = []
    for phase, c in payload.items():
        lines.append(
            f"coverage {phase}: {PERCENT * c['measured_share']:.1f}% of predicted device time measured, "
            f"{PERCENT * c['class_regressor_share']:.1f}% class regressor, {PERCENT * c['fallback_share']:.1f}% fallback"
        )
        lines += _extrapolated_lines(phase, c, plan)
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
            lines += _extrapolated_lines(phase, coverage.to_dict(), plan)
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


def _extrapolated_lines(name: str, phase: Mapping[str, Any], plan: str) -> list[str]:
    """The extrapolation line of phase NAME, none when nothing is priced beyond measured sizes (or
    it cannot be told). It names the variable that carries most of that time, at the operation
    measured least far in it: how far the steps go beyond the grid; then the `dooly plan` flags
    that measure steps of the sizes needed (`plan_flags`), where there are any."""
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
    flags = phase["plan_flags"] if "plan_flags" in phase else plan_flags(name, phase)
    if flags:
        command = plan or "dooly plan MODEL ..."
        sizes = "that many tokens" if len(flags) == 1 and flags[0].startswith("--token-budget ") else "those sizes"
        line += f"; `{command} {' '.join(flags)}` measures steps of {sizes}"
    return [line]

"""`dooly fit` and `dooly predict`: regressors on the latency database, and what they predict."""

from __future__ import annotations

import logging
from typing import Any

import click

from dooly.errors import DoolyError
from dooly.fit.coverage import require_measured_option
from dooly.output import emit_json, format_table, output_option

logger = logging.getLogger(__name__)

# The fit's defaults as plain numbers (dooly.fit.selection pulls in numpy; a test keeps them equal).
DEFAULT_FOLDS = 5
DEFAULT_REPEATS = 3
DEFAULT_ENGINE = "transformers"
DEFAULT_DTYPE = "bfloat16"
NONE_CELL = "-"
MS_PER_S = 1e3
PERCENT = 100.0


@click.command("fit")
@click.option(
    "--store",
    "store_uri",
    required=True,
    metavar="URI",
    help="Latency database: a directory or s3://bucket/prefix.",
)
@click.option(
    "--folds", default=DEFAULT_FOLDS, show_default=True, type=int, help="k of the k-fold held-out checks."
)
@click.option(
    "--repeats",
    default=DEFAULT_REPEATS,
    show_default=True,
    type=int,
    help="Repeat the seen k-fold check over this many different random fold assignments.",
)
@click.option(
    "--jobs",
    default=None,
    type=int,
    help="Processes to fit on (the held-out checks and fits are independent pieces; the models "
    "and errors are the same on any number).  [default: the CPUs available, at most 8]",
)
@output_option
def fit_command(store_uri: str, folds: int, repeats: int, jobs: int | None, output_format: str) -> None:
    """Fit latency regressors on the store's snapshot, per platform/engine/backend/dtype and op class.

    Signatures the database holds are predicted from their own measurements: a one-variable curve
    over the measured sizes (shape-preserving cubic in log-log, kernel switches kept, isolated
    outliers not followed, a partial-block time where it pays), or for attention a linear model
    of the work times a correction learned by small trees, tabulated exactly. Signatures never
    profiled (a new hidden size) use a per-class regressor over config dims and request variables.

    \b
    Held-out protocol (how every error printed is measured):
      seen: k-fold within each signature: its points are dealt into k random folds; each fold is
        predicted by models fitted on the other folds only. Whatever a model chooses from data
        (the partial-block time, its block size) is chosen by an inner cross-validation on those
        training points, so a held-out point never fits or selects its own prediction. With
        --repeats R, R different fold assignments; an op's MAPE averages all its predictions.
        The method of a class (curve, linear, trees) is the one whose held-out median is lowest.
      unseen: k-fold grouped by signature: each held-out signature is predicted by a class
        regressor that never saw any of its points.
      leave one model out: every signature of one model (from the store's inventories) removed,
        its points predicted by the class regressors refitted on the rest; beside it, the
        in-sample error of the same regressors.
    Per-op MAPE: mean absolute percentage error over an op's held-out points, every point counted;
    medians and p90 are over ops. "all profiled signatures" pools every class and group.

    Models are written under models/gen-<generation>/ as data (JSON: parameters, curves, trees,
    tables; no pickle), readable without scikit-learn; the writer's versions are recorded.

    \b
    Examples:
      dooly fit --store ./db
      dooly fit --store s3://latency-db/h100 --folds 10 --repeats 3 --output json
    """
    from dooly.fit.persist import fit_store
    from dooly.fit.report import report_text
    from dooly.store.backends import open_store

    store = open_store(store_uri, create=False)
    report = fit_store(store, folds=folds, repeats=repeats, jobs=jobs)
    if output_format == "json":
        emit_json(report.to_dict())
        return
    click.echo(report_text(report))


def _parse_prefill(values: tuple[str, ...]) -> list[tuple[int, int]]:
    chunks = []
    for text in values:
        query, sep, context = text.partition(":")
        try:
            q, c = int(query), int(context) if sep else 0
        except ValueError as exc:
            raise DoolyError(
                f"--prefill {text!r}: expected NEW_TOKENS:CONTEXT, e.g. 512:0 or 256:1024"
            ) from exc
        if q < 1 or c < 0:
            raise DoolyError(f"--prefill {text!r}: new tokens must be >= 1 and context >= 0")
        chunks.append((q, c))
    return chunks


def _parse_decode(values: tuple[int, ...]) -> list[int]:
    for value in values:
        if value < 1:
            raise DoolyError(f"--decode {value}: a decoding sequence has a context of at least 1 token")
    return list(values)


def find_inventory(
    store: Any, model: str, backend: str, tp: int = 1, *, engine: str = DEFAULT_ENGINE, dtype: str = DEFAULT_DTYPE
) -> dict[str, Any]:
    """The inventory of MODEL for one rank of `tp` traced with `backend` (see
    `dooly.fit.resolve.resolve_inventory`: the store's, else a CPU trace; never another backend's)."""
    from dooly.fit.resolve import resolve_inventory

    return resolve_inventory(store, model, backend=backend, engine=engine, dtype=dtype, tp=tp).inventory


@click.command("predict")
@click.option(
    "--store", "store_uri", required=True, metavar="URI", help="Latency database with fitted models."
)
@click.option(
    "--model",
    "model",
    required=True,
    metavar="MODEL",
    help="A bundled id, a config.json, a directory holding one, or an id or model key the store holds; "
    "a model without an inventory in the store is traced on the CPU.",
)
@click.option(
    "--platform", required=True, help="Platform the models were fitted for (GPU product string or CPU model)."
)
@click.option("--backend", required=True, help="Attention backend, e.g. paged|sdpa.")
@click.option("--engine", default=DEFAULT_ENGINE, show_default=True, help="Serving engine.")
@click.option("--dtype", default=DEFAULT_DTYPE, show_default=True, help="Model dtype.")
@click.option(
    "--prefill",
    multiple=True,
    metavar="Q:CTX",
    help="A prefill chunk: Q new tokens after CTX cached ones (repeatable).",
)
@click.option(
    "--decode",
    multiple=True,
    type=int,
    metavar="CTX",
    help="A decoding sequence with CTX cached tokens (repeatable).",
)
@click.option("--per-op", is_flag=True, help="Also list every operation of the model with its latency.")
@click.option("--tp", type=int, default=1, show_default=True, help="Tensor-parallel degree: one rank's ops plus its collectives.")
@click.option("--interconnect", default=None, help="Topology label of the collectives' measurements (where the store holds several).")
@require_measured_option
@output_option
def predict_command(
    store_uri: str,
    model: str,
    platform: str,
    backend: str,
    engine: str,
    dtype: str,
    prefill: tuple[str, ...],
    decode: tuple[int, ...],
    per_op: bool,
    tp: int,
    interconnect: str | None,
    require_measured: bool,
    output_format: str,
) -> None:
    """Predict one engine step's latency for a batch composition, with its breakdown by op class.

    The batch is what the engine's scheduler hands the model runner: prefill chunks (new tokens
    after a cached context) and decoding sequences (one new token after their context).
    Operations whose signature was never profiled on this platform are predicted from config
    dims by the class regressor, those of an op class never profiled here by the family fallback
    (bytes / FLOPs, fitted on the platform's measured ops); the coverage lines say how much of the
    predicted time is measured and list what is estimated (--require-measured: exit 2 instead).

    \b
    Examples:
      dooly predict --store ./db --model Llama-3.1-8B --platform NVIDIA-H100-80GB-HBM3 \\
          --backend 'paged|sdpa' --prefill 512:0 --decode 1000 --decode 2000
      dooly predict --store s3://latency-db/fleet --model meta-llama/Llama-3.1-8B \\
          --platform NVIDIA-H100-80GB-HBM3 --backend 'paged|sdpa' --decode 128 --per-op
    """
    from dooly.fit.source import FittedSource, open_fitted_step

    chunks = _parse_prefill(prefill)
    decodes = _parse_decode(decode)
    if not chunks and not decodes:
        raise DoolyError("an empty step: give at least one --prefill Q:CTX or --decode CTX")
    source = FittedSource(
        store=store_uri, platform=platform, backend=backend, engine=engine, dtype=dtype, tp=tp, interconnect=interconnect
    )
    from dooly.fit.coverage import check_measured, coverage_lines, coverage_payload, plan_command
    from dooly.fit.predictor import step_phase

    fitted = open_fitted_step(source, model)
    predictor, step = fitted.predictor, fitted.step
    if require_measured:
        check_measured(step, model, source)
    coverage = {step_phase(chunks, decodes): step.coverage(chunks, decodes)}
    seconds = step.step_seconds(chunks, decodes)
    breakdown = step.breakdown(chunks, decodes)
    payload: dict[str, Any] = {
        "model_id": step.model_id,
        "platform": platform,
        "engine": engine,
        "backend": backend,
        "dtype": dtype,
        "tp": tp,
        "generation": predictor.generation,
        "prefill": [list(c) for c in chunks],
        "decode": decodes,
        "step_seconds": seconds,
        "breakdown_seconds": breakdown,
        "ops": step.op_count,
        "unseen_ops": step.unseen_count,
        "inventory": fitted.inventory_origin,
        "coverage": coverage_payload(coverage),
    }
    if per_op:
        payload["operations"] = step.op_seconds(chunks, decodes)
    if output_format == "json":
        emit_json(payload)
        return
    rows = [
        (cls, f"{value * MS_PER_S:.4f}", f"{PERCENT * value / seconds:.1f}%" if seconds > 0 else NONE_CELL)
        for cls, value in sorted(breakdown.items(), key=lambda kv: -kv[1])
    ]
    lines = [
        f"{step.model_id} on {platform} / {engine} / {backend} / {dtype} "
        f"(models of generation {predictor.generation})",
        f"step: {len(chunks)} prefill chunk(s), {len(decodes)} decode(s): {seconds * MS_PER_S:.4f} ms",
        f"operations: {step.op_count}, of which unseen (predicted from config dims): {step.unseen_count}",
        *coverage_lines(coverage, fitted.inventory_origin, plan_command(model, store_uri, platform, backend)),
        "",
        format_table(("op class", "ms", "share"), rows),
    ]
    if per_op:
        op_rows = [
            (
                o["op_class"],
                o["signature"][:12],
                o["count"],
                f"{o['seconds'] * MS_PER_S:.5f}",
                o["method"],
                o["source"],
            )
            for o in payload["operations"]
        ]
        lines += [
            "",
            format_table(("op class", "signature", "count", "ms each", "method", "source"), op_rows),
        ]
    click.echo("\n".join(lines))

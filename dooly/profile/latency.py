"""What each missing point's kernel will take, as the store's fitted database predicts it.

`dooly plan` prices a point by it (`dooly.profile.costs.PointCosts.seconds`): measuring a point
runs its kernel again and again (warm-up, calibration, samples), so a model whose kernels run
twice as long as those the store measured before costs about twice as much to profile, which a
mean cost per point of the class cannot see. The latency is the product's own answer for a
signature it lacks: the class regressor, a heads/layout peer, or the family fallback for a class
never measured (`dooly.fit.predictor.Predictor.op_source`), from the newest fitted models of the
plan's platform, engine, backend and dtype. A store with none (nothing fitted yet, or fitted
before the current features) prices every point at its class's mean, and the plan says so.
The same predictions of the store's own out-of-memory rows tell where a class's memory wall
lies in latency terms (`costs.fit_memory_walls`).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from dooly.errors import DoolyError
from dooly.trace.schema import KIND_ATTENTION

if TYPE_CHECKING:
    from dooly.fit.predictor import Predictor
    from dooly.profile.provenance import Stack

log = logging.getLogger(__name__)
REQUEST_COLUMNS = ("T", "B", "K", "D")


def open_predictor(store: Any, stack: Stack) -> tuple[Predictor | None, str]:
    """The newest fitted models of the stack's group (None where the store has none usable), and
    one line saying so for the plan's output."""
    from dooly.fit.persist import store_predictor

    group = f"{stack.platform}/{stack.engine}/{stack.backend}/{stack.dtype}"
    try:
        predictor = store_predictor(store, platform=stack.platform, engine=stack.engine, backend=stack.backend,
                                    dtype=stack.dtype)
    except DoolyError as exc:
        log.info("plan: no fitted models to predict latencies with (%s)", exc)
        return None, (f"no fitted models for {group} in the store: every point at its class's mean cost "
                      f"(`dooly fit` first prices points by their predicted kernel latency)")
    return predictor, f"generation {predictor.generation}, {group}"


def predict_latencies(predictor: Predictor | None, origin: str, items: Iterable[Any]) -> str:
    """Set each work item's (`plan.WorkItem`) `latencies` (one per missing point) from PREDICTOR;
    return one line saying where they came from, for the plan's output. PREDICTOR and ORIGIN are
    what `open_predictor` returned (without a predictor, ORIGIN says why)."""
    if predictor is None:
        return origin
    predicted = total = 0
    for item in items:
        if not item.missing:
            continue
        item.latencies = item_latencies(predictor, item)
        total += len(item.missing)
        predicted += sum(latency is not None for latency in item.latencies)
    if not total:
        return "no missing points"
    return (f"kernel latencies of {predicted} of {total} missing points predicted by the store's fitted models "
            f"({origin}); the rest at their class's mean cost")


def item_latencies(predictor: Predictor, item: Any) -> list[float | None]:
    """The predicted seconds of one call at each missing point of a work item (`plan.WorkItem`)."""
    op = item.op
    request_vars = op.request_vars()
    names = set(request_vars) | (set(item.missing[0].as_dict) if op.kind == KIND_ATTENTION else set())
    request: dict[str, Any] = {var: [point.as_dict.get(var, 0) for point in item.missing] for var in sorted(names)}
    if op.kind == KIND_ATTENTION:
        request["seqs"] = [json.loads(point.key)["seqs"] for point in item.missing]
    return _predict(predictor, item.signature, op.op_class(), op.op, op.config_dims(), request_vars, request,
                    len(item.missing))


def row_latencies(predictor: Predictor, rows: Sequence[Mapping[str, Any]]) -> list[float | None]:
    """The predicted seconds of one call at each shard row's point (its signature's own model
    where the fit measured it): rows as `dooly.store.shards.read_held` reads them."""
    by_signature: dict[str, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        by_signature[str(row["signature"])].append(index)
    found: list[float | None] = [None] * len(rows)
    for signature, indices in by_signature.items():
        first = rows[indices[0]]
        request: dict[str, Any] = {var: [rows[i][var] or 0 for i in indices] for var in REQUEST_COLUMNS}
        payloads = [json.loads(rows[i]["point_key"]) for i in indices]
        if all(isinstance(payload, dict) and "seqs" in payload for payload in payloads):
            request["seqs"] = [payload["seqs"] for payload in payloads]
        config = {str(k): int(v) for k, v in json.loads(first["config_dims"] or "{}").items()}
        variables = json.loads(first["request_vars"] or "[]")
        seconds = _predict(predictor, signature, str(first["op_class"]), str(first["op"]), config, variables, request,
                           len(indices))
        for i, value in zip(indices, seconds, strict=True):
            found[i] = value
    return found


def _predict(predictor: Predictor, signature: str, op_class: str, op: str, config: Mapping[str, int],
             request_vars: Sequence[str], request: Mapping[str, Any], n: int) -> list[float | None]:
    """N predictions of one signature (None for each where the fitted models cannot answer for it:
    an attention class never fitted, say)."""
    try:
        seconds = predictor.predict_ops([signature] * n, [op_class] * n, [dict(config)] * n, request,
                                        request_vars=[list(request_vars)] * n, ops=[op] * n)
    except (DoolyError, KeyError, ValueError) as exc:
        log.debug("no latency for %s (%s): %s", signature, op_class, exc)
        return [None] * n
    return [float(value) if value > 0 else None for value in seconds]

"""The answer of an exploration: goodput per GPU and per dollar, memory fit, the ranked table, the
cost-latency Pareto frontier, and their files (text, JSON, CSV, PNG plots).

Ranking: candidates that fit in memory, are served by their engine and meet the SLO at a positive
rate, by output tokens per dollar (per GPU-hour when a platform has no price), then the rest.
Frontier: every simulated operating point (candidate x rate) that met the SLO, by cost (USD per
million output tokens, or GPU-hours per million without prices) against latency (the first SLO's
statistic); a point is on the frontier when no other is at least as cheap and as fast and better
in one. Cheaper points sit at higher rates and so at higher latency: the frontier is what trading
latency for cost buys.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any

from dooly.explore.hardware import PriceTable
from dooly.fit.resolve import ORIGIN_STORE
from dooly.output import format_table

SCHEMA = "dooly.explore/1"
SECONDS_PER_HOUR = 3600.0
PER_MILLION = 1e6
MS_PER_S = 1e3
TOP_PLOTTED = 6
# A fallback share below half a percent is not shown beside the measured share.
COVERAGE_SHOWN_SHARE = 0.005
CSV_COLUMNS = (
    "rank", "model", "platform", "engine", "backend", "dtype", "tp", "settings", "status", "capacity_rps",
    "output_tokens_per_s", "capacity_rps_per_gpu", "output_tokens_per_s_per_gpu", "usd_per_gpu_hour",
    "requests_per_usd", "output_tokens_per_usd", "usd_per_million_output_tokens", "fits", "weights_gib_per_gpu",
    "kv_cache_gib_per_gpu", "coverage_measured_share", "coverage_class_regressor_share", "coverage_fallback_share",
    "inventory", "overhead", "limited_by", "reason",
)
# `--client http` only: the server-cost record a candidate got (`server_costs_label`).
SERVER_COSTS_COLUMN = "server_costs"


def price_result(result: dict[str, Any], prices: PriceTable) -> None:
    """Goodput per GPU and per dollar for one searched candidate (in place)."""
    c = result["candidate"]
    tp = int(c["tp"])
    price = prices.price(c["platform"])
    at = result.get("at_capacity") or {}
    rps = float(result.get("capacity_rps") or 0.0)
    tokens = float(at.get("output_tokens_per_s") or 0.0) if rps > 0 else 0.0
    goodput: dict[str, Any] = {
        "capacity_rps": rps,
        "output_tokens_per_s": tokens,
        "capacity_rps_per_gpu": rps / tp,
        "output_tokens_per_s_per_gpu": tokens / tp,
        "usd_per_gpu_hour": price,
        "gpu_hours_per_million_output_tokens": tp * PER_MILLION / (tokens * SECONDS_PER_HOUR) if tokens > 0 else None,
    }
    if price is not None:
        hourly = price * tp
        goodput.update(
            requests_per_usd=rps * SECONDS_PER_HOUR / hourly,
            output_tokens_per_usd=tokens * SECONDS_PER_HOUR / hourly,
            usd_per_million_output_tokens=hourly * PER_MILLION / (tokens * SECONDS_PER_HOUR) if tokens > 0 else None,
        )
    result["goodput"] = goodput


def deployable(result: dict[str, Any]) -> bool:
    return (result.get("status") == "ok" and result.get("capacity_rps", 0) > 0
            and result.get("memory", {}).get("fits") is not False and not result.get("note"))


def rank(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Deployable candidates best first (output tokens per USD, else per GPU), then the others."""
    def key(r: dict[str, Any]) -> tuple[float, float, float]:
        g = r.get("goodput", {})
        return (0.0 if deployable(r) else 1.0, -(g.get("output_tokens_per_usd") or 0.0),
                -(g.get("output_tokens_per_s_per_gpu") or 0.0))

    ordered = sorted(results, key=key)
    for i, r in enumerate(ordered, 1):
        r["rank"] = i if deployable(r) else None
    return ordered


def frontier(results: list[dict[str, Any]], prices: PriceTable, latency_key: str) -> dict[str, Any]:
    """Pareto frontier of (cost, latency) over every deployable operating point that met the SLO,
    one per model (models are different products: a planner trades configurations of one).

    Cost is USD per million output tokens when every deployable candidate's platform has a price,
    else GPU-hours per million output tokens for all (one unit on one axis)."""
    chosen = [r for r in results if deployable(r)]
    use_usd = all(prices.price(r["candidate"]["platform"]) is not None for r in chosen)
    unit = "USD per 1M output tokens" if use_usd else "GPU-hours per 1M output tokens"
    points = []
    for r in chosen:
        tp = r["candidate"]["tp"]
        factor = prices.price(r["candidate"]["platform"]) if use_usd else 1.0
        for p in r.get("points", []):
            tokens = p.get("output_tokens_per_s") or 0.0
            latency = p["slo_values_s"].get(latency_key)
            if not p["ok"] or tokens <= 0 or latency is None:
                continue
            cost = (factor or 1.0) * tp * PER_MILLION / (tokens * SECONDS_PER_HOUR)
            points.append({"label": r["label"], "candidate": r["candidate"], "rate_rps": p["rate_rps"],
                           "cost": cost, "latency_s": latency})
    by_model: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        by_model.setdefault(p["candidate"]["model"], []).append(p)
    models = {model: {"points": _pareto(found), "all_points": found} for model, found in by_model.items()}
    return {"cost_unit": unit, "latency": latency_key, "models": models,
            "points": [p for m in models.values() for p in m["points"]], "all_points": points}


def _pareto(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points no other is at least as cheap and as fast as (and better in one), cheapest first."""
    ordered = sorted(points, key=lambda p: (p["cost"], p["latency_s"]))
    best_latency = math.inf
    on_frontier = []
    for p in ordered:
        if p["latency_s"] < best_latency:
            on_frontier.append(p)
            best_latency = p["latency_s"]
    return on_frontier


def csv_text(ranked: list[dict[str, Any]], unpredictable: list[dict[str, Any]], server_costs: bool = False) -> str:
    """One row per candidate; `server_costs` (`--client http`) adds the column of the record each
    candidate got (in-process files keep their columns)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS + (SERVER_COSTS_COLUMN,) if server_costs else CSV_COLUMNS,
                            lineterminator="\n")
    writer.writeheader()
    for r in ranked + unpredictable:
        c, g, m, cov = r["candidate"], r.get("goodput", {}), r.get("memory", {}), r.get("coverage", {})
        extra = {SERVER_COSTS_COLUMN: server_costs_label(r.get("server_costs"))} if server_costs else {}
        writer.writerow({**extra,
            "rank": r.get("rank") or "", "model": c["model"], "platform": c["platform"], "engine": c["engine"],
            "backend": c["backend"], "dtype": c["dtype"], "tp": c["tp"],
            "settings": " ".join(f"{k}={v}" for k, v in sorted(c["settings"].items())),
            "status": r["status"], **{k: _csv(g.get(k)) for k in (
                "capacity_rps", "output_tokens_per_s", "capacity_rps_per_gpu", "output_tokens_per_s_per_gpu",
                "usd_per_gpu_hour", "requests_per_usd", "output_tokens_per_usd", "usd_per_million_output_tokens")},
            "fits": _csv(m.get("fits")), "weights_gib_per_gpu": _csv(m.get("weights_gib_per_gpu")),
            "kv_cache_gib_per_gpu": _csv(m.get("kv_cache_gib_per_gpu")),
            "coverage_measured_share": _csv(cov.get("measured_share")),
            "coverage_class_regressor_share": _csv(cov.get("class_regressor_share")),
            "coverage_fallback_share": _csv(cov.get("fallback_share")), "inventory": cov.get("inventory", ""),
            "overhead": r.get("overhead", ""), "limited_by": r.get("limited_by", ""),
            "reason": r.get("reason") or r.get("note") or "",
        })
    return buffer.getvalue()


def coverage_label(coverage: dict[str, Any]) -> str:
    """`93% meas` (or `93% meas, 2% fallback`): the measured share of the predicted device time at
    the candidate's capacity, and the fallback's share when any (the least trustworthy part);
    `traced` marks a model the store never held, whose inventory is a CPU trace."""
    measured = coverage.get("measured_share")
    if measured is None:
        return "-"
    text = f"{measured:.0%} meas"
    fallback = coverage.get("fallback_share") or 0.0
    if fallback >= COVERAGE_SHOWN_SHARE:
        text += f", {fallback:.0%} fallback"
    if coverage.get("inventory") and coverage.get("inventory") != ORIGIN_STORE:
        text += ", traced"
    return text


def server_costs_label(costs: dict[str, Any] | None) -> str:
    """`generation 1 of <key>: +12.3 ms TTFT, +0.00 ms TPOT (TPOT withheld)`: the record a
    candidate got under `--client http` and the per-request offsets it added ('' for none)."""
    if not costs:
        return ""
    text = (f"{costs['record']}: {costs['applied_ttft_s'] * MS_PER_S:+.1f} ms TTFT, "
            f"{costs['applied_tpot_s'] * MS_PER_S:+.2f} ms TPOT per request")
    if costs.get("step_term"):
        text += ", a host term per step"
    withheld = costs.get("withheld_offsets") or {}
    if withheld:
        text += " (" + "; ".join(f"{name} offset withheld: {why}" for name, why in sorted(withheld.items())) + ")"
    return text


def _csv(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def _fmt(value: Any, digits: str = ".3g") -> str:
    return "-" if value is None else format(value, digits)


def text_report(document: dict[str, Any]) -> str:
    """The ranked table, the frontier and the unpredictable candidates, for a terminal."""
    slo_text = ", ".join(f"{s['name']} <= {s['limit_s'] * MS_PER_S:g} ms" for s in document["slo"])
    lines = [f"dooly explore: {', '.join(document['models'])} on store {document['store']} "
             f"(generation {document['generation']}); SLO {slo_text}",
             f"prices: {document['prices']['source']}" + ("  [EXAMPLE prices, not quotes]" if document["prices"]["example"] else ""),
             f"coverage: {document['coverage_note']}", ""]
    if document.get("client"):
        lines[-1:-1] = [f"client: {document['client']}: the store's server-cost record of each candidate's key added "
                        "(its step term to every step, its checked offsets to every request)"]
        lines[-1:-1] = [f"  {server_costs_label(record)}" for record in document["server_costs"]]
    rows = []
    for r in document["candidates"]:
        g, m, cov = r.get("goodput", {}), r.get("memory", {}), r.get("coverage", {})
        rows.append((
            r.get("rank") or "-", r["label"], _fmt(g.get("capacity_rps")), _fmt(g.get("output_tokens_per_s"), ".0f"),
            _fmt(g.get("output_tokens_per_s_per_gpu"), ".0f"), _fmt(g.get("usd_per_million_output_tokens"), ".3f"),
            {True: "yes", False: "NO", None: "?"}[m.get("fits")], _fmt(m.get("kv_cache_gib_per_gpu"), ".1f"),
            coverage_label(cov),
            r.get("limited_by") or r.get("reason") or r.get("note") or r["status"],
        ))
    lines.append(format_table(["rank", "candidate", "req/s", "out tok/s", "tok/s/GPU", "$/1M tok", "fits", "KV GiB",
                               "coverage", "limit"], rows))
    best = document.get("best")
    lines.append("")
    if best:
        lines.append(f"best: {best['label']}: {best['goodput']['capacity_rps']:.3g} req/s "
                     f"({best['goodput']['output_tokens_per_s']:.0f} output tok/s)")
    else:
        closest = document.get("closest")
        if closest:
            lines.append(f"no candidate meets the SLO; closest: {closest['label']} ({closest['detail']})")
        else:
            statuses: dict[str, int] = {}
            for r in document["candidates"]:
                statuses[r["status"]] = statuses.get(r["status"], 0) + 1
            counts = ", ".join(f"{n} {status.replace('_', ' ')}" for status, n in sorted(statuses.items()))
            lines.append(f"no candidate meets the SLO ({counts})")
    front = document["frontier"]
    for model, found in front["models"].items():
        lines += ["", f"Pareto frontier of {model} ({front['cost_unit']} vs {front['latency']}):",
                  format_table(["candidate", "rate req/s", "cost", f"{front['latency']} ms"],
                               [(p["label"], _fmt(p["rate_rps"]), _fmt(p["cost"], ".3f"), _fmt(p["latency_s"] * MS_PER_S, ".1f"))
                                for p in found["points"]])]
    if document["unpredictable"]:
        lines += ["", "not predictable from this store:"]
        lines += [f"  {u['label']}: {u['reason']}" for u in document["unpredictable"]]
    return "\n".join(lines)


def closest_candidate(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """When nothing meets the SLO: the candidate whose lowest tried rate came nearest to it."""
    best = None
    for r in results:
        point = r.get("closest")
        if not point:
            continue
        if best is None or point["worst_slo_ratio"] < best[1]["worst_slo_ratio"]:
            best = (r, point)
    if best is None:
        return None
    r, point = best
    values = ", ".join(f"{k} {v * MS_PER_S:.1f} ms" for k, v in point["slo_values_s"].items() if v is not None)
    return {"label": r["label"], "candidate": r["candidate"], "rate_rps": point["rate_rps"],
            "worst_slo_ratio": point["worst_slo_ratio"],
            "detail": f"{values} at {point['rate_rps']:.3g} req/s, {point['worst_slo_ratio']:.2f}x the SLO"}

"""Would attention measured for some head layouts serve another layout? What sharing attention
across head layouts would save, and at what accuracy (CPU, about a minute).

The campaign profiles each attention signature (backend, query heads, KV heads, head dim, window)
over the whole grid; two models share it only when all of those agree, so signature reuse alone
stops at the campaign's saving. Three ways to serve a new layout from the layouts already held,
each scored on every attention signature of the committed store against the signature's own
fitted model (its 5-fold held-out error, `dooly fit`'s report):

- `unseen`: the attention class regressor fitted on every other signature of the backend (config
  dims as features), no point of the new layout measured;
- `probe`: the same, plus one grid point in PROBE_EVERY of the new layout measured: the regressor
  refitted with them, or scaled to them per regime (prefill, decode, mixed); scored on the points
  left unmeasured;
- `heads`: per grid point, time as an affine function of the query heads, through the signatures
  that differ from the new one in query heads alone (at least two of them).

Each scheme's error is its best over the class regressor's methods and variants, chosen on the
signature's own points: an upper bound on what the scheme could do. The saving replays the
campaign (`campaign_from_store.py`) with every signature a scheme can serve (its prerequisites
profiled earlier in the campaign's order) costing only its probe's device time, first for all of
them, then for those served at least as accurately as their own model.

    python reports/attention_transfer.py --store FITTED_STORE --out data/h100/experiments/attention_transfer/transfer.json

FITTED_STORE: a copy of data/h100/db after `dooly merge` and `dooly fit` (the report makes one).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import campaign_from_store
import numpy as np

from dooly.fit.regressors import ATTENTION_UNSEEN_METHODS, fit_class_regressor
from dooly.fit.training import GroupData, class_design, group_data, training_rows
from dooly.store.backends import open_store
from dooly.store.merge import read_snapshot

log = logging.getLogger("attention_transfer")

ROOT = Path(__file__).resolve().parent.parent
COMMITTED_STORE = ROOT / "data" / "h100" / "db"
PLATFORM = "NVIDIA-H100-80GB-HBM3"
ATTENTION_CLASS_PREFIX = "attention:"
# A probe measures one grid point in PROBE_EVERY of a new layout (17%), taken evenly in point order.
PROBE_EVERY = 6
# The config dims that carry the query heads (the query tensor's head axis).
QUERY_HEAD_DIMS = ("in0.1",)
MIN_HEAD_LAYOUTS = 2
PERCENT = 100.0
SCHEMES = ("unseen", "probe", "heads")


@dataclass
class Target:
    """One attention signature's points, seen from its backend's class."""

    backend: str
    signature: str
    config: dict[str, int]
    rows: np.ndarray  # positions in the class design
    point_keys: list[str]


def mape(predicted: np.ndarray, seconds: np.ndarray) -> float:
    return float(np.mean(np.abs(predicted / seconds - 1.0)) * PERCENT)


def probe_mask(point_keys: list[str]) -> np.ndarray:
    """One point in PROBE_EVERY, evenly over the signature's points in key order."""
    order = np.argsort(point_keys)
    mask = np.zeros(len(point_keys), dtype=bool)
    mask[order[::PROBE_EVERY]] = True
    return mask


def attention_targets(data: GroupData) -> Iterator[tuple[object, Target]]:
    """The attention class design of a backend group and each of its signatures."""
    classes = [c for c in set(data.row_class.tolist()) if c.startswith(ATTENTION_CLASS_PREFIX)]
    for op_class in classes:
        design = class_design(data, op_class, np.flatnonzero(data.row_class == op_class))
        for sig_id in sorted(set(design.sig_ids.tolist())):
            rows = np.flatnonzero(design.sig_ids == sig_id)
            info = data.infos[sig_id]
            yield design, Target(
                backend=data.key[2],
                signature=info.signature,
                config=info.config_dims,
                rows=rows,
                point_keys=[data.point_keys[design.rows[r]] for r in rows],
            )


def class_scheme_errors(design, target: Target) -> dict[str, float]:
    """`unseen` and `probe` errors: the class regressor without the target, then with its probe."""
    others = np.ones(len(design.seconds), dtype=bool)
    others[target.rows] = False
    probe = probe_mask(target.point_keys)
    rest = target.rows[~probe]
    seconds = design.seconds[target.rows]
    unseen, probed = [], []
    for method in ATTENTION_UNSEEN_METHODS:
        regressor = fit_class_regressor(method, design.physical[others], design.logx[others], design.seconds[others],
                                        design.regimes[others])
        predicted = regressor.predict(design.physical[target.rows], design.logx[target.rows], design.regimes[target.rows])
        unseen.append(mape(predicted, seconds))
        scaled = predicted.copy()
        regimes = design.regimes[target.rows]
        overall = np.exp(np.median(np.log(seconds[probe] / predicted[probe])))
        for regime in np.unique(regimes):
            measured = (regimes == regime) & probe
            factor = np.exp(np.median(np.log(seconds[measured] / predicted[measured]))) if measured.any() else overall
            scaled[regimes == regime] *= factor
        probed.append(mape(scaled[~probe], seconds[~probe]))
        train = others.copy()
        train[target.rows[probe]] = True
        refitted = fit_class_regressor(method, design.physical[train], design.logx[train], design.seconds[train],
                                       design.regimes[train])
        probed.append(mape(refitted.predict(design.physical[rest], design.logx[rest], design.regimes[rest]),
                           design.seconds[rest]))
    return {"unseen": min(unseen), "probe": min(probed)}


def same_but_heads(config: dict[str, int], other: dict[str, int]) -> bool:
    return config != other and all(config.get(k) == other.get(k) for k in set(config) | set(other)
                                   if k not in QUERY_HEAD_DIMS)


def query_heads(target: Target) -> int:
    return target.config[QUERY_HEAD_DIMS[0]]


def heads_error(design, target: Target, targets: list[Target]) -> tuple[float | None, list[str]]:
    """Per grid point, time affine in the query heads through the layouts that differ in them alone."""
    peers = [t for t in targets if t.backend == target.backend and same_but_heads(target.config, t.config)]
    if len(peers) < MIN_HEAD_LAYOUTS:
        return None, []
    by_key = [dict(zip(p.point_keys, design.seconds[p.rows], strict=True)) for p in peers]
    predicted, measured = [], []
    for key, seconds in zip(target.point_keys, design.seconds[target.rows], strict=True):
        known = [(query_heads(p), table[key]) for p, table in zip(peers, by_key, strict=True) if key in table]
        if len({h for h, _ in known}) < MIN_HEAD_LAYOUTS:
            continue
        x = np.array([[1.0, h] for h, _ in known])
        coef = np.linalg.lstsq(x, np.array([s for _, s in known]), rcond=None)[0]
        predicted.append(coef[0] + coef[1] * query_heads(target))
        measured.append(seconds)
    if not measured:
        return None, []
    return mape(np.array(predicted), np.array(measured)), [p.signature for p in peers]


def own_errors(store) -> dict[str, float]:
    """Each attention signature's own model's held-out error (the fit's report)."""
    from dooly.fit.persist import latest_meta_key
    from dooly.store.documents import read_json

    meta = read_json(store, latest_meta_key(store))
    if meta is None:
        raise FileNotFoundError(f"no fit report in {store}: run `dooly fit` on it first")
    return {sig: err for group in meta["groups"] if group["platform"] == PLATFORM for cls in group["classes"]
            if cls["op_class"].startswith(ATTENTION_CLASS_PREFIX)
            for sig, err in cls["seen_mape_by_signature"].items()}


def signature_rows(fitted: Path) -> list[dict]:
    store = open_store(str(fitted))
    frame, _ = read_snapshot(store)
    own = own_errors(store)
    out = []
    for data in group_data(training_rows(frame)):
        if data.key[0] != PLATFORM:
            continue
        designs = list(attention_targets(data))
        targets = [t for _, t in designs]
        for design, target in designs:
            errors: dict[str, float | None] = {**class_scheme_errors(design, target)}
            errors["heads"], peers = heads_error(design, target, targets)
            out.append({"backend": target.backend, "signature": target.signature, "config": target.config,
                        "points": len(target.rows), "own_error_pct": own.get(target.signature),
                        "head_peers": peers, **{f"{s}_error_pct": errors[s] for s in SCHEMES}})
            log.info("%s %s: %s", target.backend, target.config, errors)
    return out


def probe_seconds(held) -> dict[str, float]:
    """What measuring each signature's probe points cost (its held rows at those points)."""
    cost = {}
    for (signature,), part in held.group_by(["signature"]):
        keys = part.get_column("point_key").to_list()
        cost[signature] = float(part.get_column("device_seconds").to_numpy()[probe_mask(keys)].sum())
    return cost


def servable(row: dict, scheme: str, earlier: set[str], attention: set[str]) -> bool:
    """Whether the campaign held what `scheme` needs before this signature came up."""
    if scheme == "heads":
        return bool(row["head_peers"]) and sum(p in earlier for p in row["head_peers"]) >= MIN_HEAD_LAYOUTS
    return any(s in attention for s in earlier)


def served_cost(row: dict | None, schemes: tuple[str, ...], earlier: set[str], attention: set[str],
                accurate_only: bool, probes: dict[str, float]) -> float | None:
    """What a new signature costs when one of `schemes` serves it (the cheapest that can, at least
    as accurate as its own model where `accurate_only`), or None when none can."""
    if row is None:
        return None
    costs = []
    for scheme in schemes:
        error = row[f"{scheme}_error_pct"]
        if error is None or not servable(row, scheme, earlier, attention):
            continue
        if accurate_only and (row["own_error_pct"] is None or error > row["own_error_pct"]):
            continue
        costs.append(probes.get(row["signature"], 0.0) if scheme == "probe" else 0.0)
    return min(costs) if costs else None


def savings(store_dir: Path, rows: list[dict]) -> dict[str, dict]:
    """The campaign replayed with each scheme (and the cheapest of all three) serving what it can:
    all of it, and only where it is at least as accurate as the signature's own model."""
    order = campaign_from_store.suite_order(campaign_from_store.SUITE_ORDER)
    held = campaign_from_store.held_rows(store_dir)
    steps = campaign_from_store.campaign_steps(store_dir, held, campaign_from_store.CAMPAIGN_BACKENDS.split(","), order)
    spent = campaign_from_store.spent_by_signature(held)
    probes = probe_seconds(held)
    by_sig = {r["signature"]: r for r in rows}
    attention = set(by_sig)
    alone = sum(step.plan.items[s].held_seconds for step in steps for s in step.signatures)
    total = sum(spent.get(s, 0.0) for step in steps for s in step.new)
    out = {"campaign": {"device_seconds": total, "baseline_device_seconds": alone, "saving": 1 - total / alone}}
    for name, schemes in (*((s, (s,)) for s in SCHEMES), ("any", SCHEMES)):
        for accurate_only in (False, True):
            cost, served = total, []
            earlier: dict[str, set[str]] = {}
            for step in steps:
                held = earlier.setdefault(step.backend, set())
                for signature in step.new:
                    paid = served_cost(by_sig.get(signature), schemes, held, attention, accurate_only, probes)
                    if paid is not None:
                        cost -= spent.get(signature, 0.0) - paid
                        served.append(signature)
                    held.add(signature)
            key = f"{name}{'_at_equal_accuracy' if accurate_only else ''}"
            out[key] = {"served": len(served), "signatures": served, "device_seconds": cost,
                        "saving": 1 - cost / alone}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True, help="A fitted copy of the campaign store.")
    parser.add_argument("--campaign-store", type=Path, default=COMMITTED_STORE,
                        help="The campaign's store as committed (its shards give the device time).")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rows = signature_rows(args.store)
    result = {"probe_every": PROBE_EVERY, "signatures": rows, "campaign": savings(args.campaign_store, rows)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""An attention head layout the store never profiled: how well is it predicted from the others?
(CPU, about a minute.)

For every `paged|sdpa` and `paged|eager` attention signature of a fitted store, the layouts sharing
its (query heads, KV heads, head dim) are held out (gemma-2-9b's sliding and full layers go
together) and its measured grid points are predicted by:

- `class`: the backend's attention class regressor (the method the fit chose for unseen
  signatures) refitted without them;
- `heads-affine`: what `Predictor` serves now (dooly.fit.group.heads_affine_model): the own models
  of measured layouts that differ in query heads only, combined affinely in the heads; only where
  there are two such layouts; and its `heads-proportional` and `heads-shared` columns where it
  serves one peer alone (eager and sdpa attention respectively);
- `nearest-ratio`: the nearest measured layout of the same window (|log| distance in query heads,
  KV heads, head dim), its measured time at the same batch scaled by the regime-NNLS class
  regressor's ratio between the two layouts;
- one query-head peer (`--one-peer` table: every held-out layout with each measured layout that
  differs from it in query heads only, alone; its own model at its own wave size, as heads-affine
  evaluates its peers), with r = heads / peer heads:
  `heads-proportional`: t = r t_peer(x);
  `heads-shared`: the peer's own linear work split into the terms the query heads do not scale
  (launch, sequences, decodes, KV reads K and S, KV alignment) and those they do (query tokens,
  score pairs, padded pairs, waves, pair alignment), the latter times r: per batch
  t = t_peer(x) (s + (1 - s) r) with s the first part's share (the model stays linear work times
  its own correction; dooly.fit.group.heads_shared_share, what the product serves on sdpa);
  `heads-shared-class`: the same with s from the regime-NNLS class regressor refitted without the
  layout, evaluated at the peer's layout, its features split the same way (launch, per sequence,
  per decode, KV and window KV elements, dense mask vs the rest);
- `product` (`--one-peer` table): what `Predictor` serves the layout with that peer alone
  (`heads-proportional` on eager, `heads-shared` on sdpa; `-` where it answers by the class regressor);
- `layout-scaled`: the nearest measured layout of the same window (dooly.fit.group.layout_scaled_model),
  its own work's parts scaled by the layout: per call, sequence and decode not at all, query rows
  and KV reads by query heads x head dim, score pairs by query heads; what the product serves
  eager full attention where no query-head peer exists, computed here on sdpa and on
  sliding-window layouts too;
- `point-nnls`: per grid point, a relative NNLS across the other layouts' measured times over
  physical terms of layout and batch (launch, KV bytes, Q bytes, FLOPs of the packed and the
  waved kernel, score elements, a window flag and the window's score elements).

Errors: MAPE over the signature's points, the time-weighted error (sum |p - y| / sum y, what a
served cell's means follow) and the bias (sum p / sum y - 1).

    python bench/attention_layouts.py --store FITTED_STORE --out data/h100/experiments/unseen/attention_layouts.json
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from dooly.fit.features import (
    ATTENTION_FEATURES,
    NUM_HEADS,
    TERM_INDEX,
    aggregates_from_seqs,
    attention_field,
    kernel_waves,
    parse_point,
    regime_of,
    sm_count,
    term_matrix,
)
from dooly.fit.group import (
    MAX_HEADS_EXTRAPOLATION,
    GroupModel,
    heads_shared_seconds,
    heads_shared_share,
    layout_scaled_model,
    other_dims,
    peer_linear_coef,
)
from dooly.fit.persist import latest_meta_key, load_group, read_meta
from dooly.fit.predictor import Predictor
from dooly.fit.regressors import (
    METHOD_HEADS_AFFINE,
    METHOD_HEADS_PROPORTIONAL,
    METHOD_HEADS_SHARED,
    METHOD_REGIME,
    MIN_SECONDS,
    BoundClassModel,
    ClassRegressor,
    OpModel,
    fit_class_regressor,
    relative_nnls,
)
from dooly.fit.training import ClassDesign, GroupData, class_design, group_data, training_rows
from dooly.store.backends import open_store
from dooly.store.merge import read_snapshot

log = logging.getLogger("attention_layouts")

PLATFORM = "NVIDIA-H100-80GB-HBM3"
BACKENDS = ("paged|sdpa", "paged|eager")
ATTENTION_PREFIX = "attention:"
PERCENT = 100.0
SCHEMES = ("class", "heads-affine", "nearest-ratio", "point-nnls", "heads-proportional", "heads-shared", "layout-scaled")
# The implementations `layout-scaled` is computed for (the product serves eager only).
LAYOUT_SCALED_STUDIED = ("eager", "sdpa")
ONE_PEER_SCHEMES = ("class", "heads-proportional", "heads-shared", "heads-shared-class", "product")
# What the product serves a layout with one query-head peer by (per implementation).
ONE_PEER_METHODS = {"paged|eager": METHOD_HEADS_PROPORTIONAL, "paged|sdpa": METHOD_HEADS_SHARED}
# Class physical features the query heads do not scale.
SHARED_FEATURES = ("launch", "per_seq", "per_decode", "kv_elems", "window_kv_elems", "dense_mask")
# Layout = (query heads, KV heads, head dim, sliding window).
Layout = tuple[int, int, int, int]


def layout_of(config: dict[str, int]) -> Layout:
    return (config["in0.1"], config["in1.1"], config["in0.3"], int(config.get("sliding_window", 0) or 0))


def errors(predicted: np.ndarray, seconds: np.ndarray) -> dict[str, float]:
    return {
        "mape_pct": float(np.mean(np.abs(predicted / seconds - 1.0)) * PERCENT),
        "weighted_pct": float(np.abs(predicted - seconds).sum() / seconds.sum() * PERCENT),
        "bias_pct": float((predicted.sum() / seconds.sum() - 1.0) * PERCENT),
    }


def layout_distance(a: Layout, b: Layout) -> float:
    return float(sum(abs(np.log(x / y)) for x, y in zip(a[:3], b[:3], strict=True)))


def point_features(terms: np.ndarray, layout: Layout, platform: str) -> np.ndarray:
    """Physical terms of one layout at its batches (rows of request terms at its own window)."""
    heads, kv_heads, head_dim, window = layout
    windowed = 1.0 if window else 0.0
    column = {name: terms[:, TERM_INDEX[name]] for name in ("T", "S", "T*K")}
    sms = sm_count(platform)
    waves = kernel_waves(column["T"], sms / heads if sms else 0.0)
    return np.stack([
        np.ones(len(terms)),
        kv_heads * head_dim * column["S"],
        heads * head_dim * column["T"],
        waves * column["S"] * head_dim,
        heads * head_dim * column["T*K"],
        heads * column["T*K"],
        np.full(len(terms), windowed),
        windowed * heads * column["T*K"],
    ], axis=1)


class Study:
    """One backend's attention class: its design and its signatures' layouts and points."""

    def __init__(self, data: GroupData, design: ClassDesign, group: GroupModel, unseen_method: str,
                 platform: str = PLATFORM) -> None:
        self.data = data
        self.platform = platform
        self.design = design
        self.group = group
        self.unseen_method = unseen_method
        self.sigs = sorted(set(design.sig_ids.tolist()))
        self.layouts = {s: layout_of(data.infos[s].config_dims) for s in self.sigs}
        self.keys = [data.point_keys[r] for r in design.rows]
        self.terms = data.terms[design.rows]
        self.by_key: dict[str, list[int]] = {}
        for i, key in enumerate(self.keys):
            self.by_key.setdefault(key, []).append(i)

    def held_out(self, target: int) -> list[int]:
        return [s for s in self.sigs if self.layouts[s][:3] == self.layouts[target][:3]]

    def class_fit(self, method: str, held: list[int]) -> np.ndarray:
        d = self.design
        train = ~np.isin(d.sig_ids, held)
        regressor = fit_class_regressor(method, d.physical[train], d.logx[train], d.seconds[train], d.regimes[train])
        return regressor.predict(d.physical, d.logx, d.regimes)

    def without(self, held: list[int]) -> GroupModel:
        """The fitted group without the held-out layouts' models, its attention class's measured
        layouts without theirs."""
        held_sigs = {self.data.infos[s].signature for s in held}
        layouts = {self.data.infos[s].signature: dict(self.data.infos[s].config_dims) for s in self.sigs if s not in held}
        op_class = self.design.op_class
        return replace(
            self.group,
            signatures={s: m for s, m in self.group.signatures.items() if s not in held_sigs},
            classes={**self.group.classes, op_class: replace(self.group.classes[op_class], layouts=layouts)},
        )

    def heads_affine(
        self, target: int, held: list[int], test: np.ndarray, method: str = METHOD_HEADS_AFFINE
    ) -> np.ndarray | None:
        """The product's prediction with the held-out layouts' models and rows removed, where it
        serves the layout by `method` (else None)."""
        info = self.data.infos[target]
        predictor = Predictor(self.without(held))
        model, _ = predictor.op_model(info.signature, info.op_class, info.config_dims, info.request_vars, info.op)
        if model.method != method:
            return None
        seqs = [parse_point(self.keys[i])["seqs"] for i in test]
        return np.asarray(predictor.predict_ops(
            [info.signature] * len(test), [info.op_class] * len(test), [info.config_dims] * len(test),
            {"seqs": seqs}, request_vars=[info.request_vars] * len(test), ops=[info.op] * len(test),
        ))

    def layout_scaled(self, target: int, held: list[int], test: np.ndarray) -> np.ndarray | None:
        """`layout_scaled_model` with the held-out layouts' models removed, on any implementation and
        window."""
        group = self.without(held)
        model = layout_scaled_model(group.classes[self.design.op_class], self.data.infos[target], group.signatures,
                                    LAYOUT_SCALED_STUDIED, windowed=True)
        if model is None:
            return None
        return np.maximum(model.predict_terms(self.peer_terms(model, test)), MIN_SECONDS)

    def nearest_ratio(self, target: int, held: list[int], test: np.ndarray) -> np.ndarray | None:
        same_window = [s for s in self.sigs if s not in held and self.layouts[s][3] == self.layouts[target][3]]
        if not same_window:
            return None
        ref = min(same_window, key=lambda s: layout_distance(self.layouts[s], self.layouts[target]))
        scale = self.class_fit(METHOD_REGIME, held)
        out = []
        for i in test:
            rows = [j for j in self.by_key[self.keys[i]] if self.design.sig_ids[j] == ref]
            out.append(scale[i] * self.design.seconds[rows[0]] / scale[rows[0]] if rows else scale[i])
        return np.array(out)

    def point_nnls(self, target: int, held: list[int], test: np.ndarray) -> np.ndarray:
        """NaN at a point no other layout measured."""
        out = []
        for i in test:
            rows = [j for j in self.by_key[self.keys[i]] if self.design.sig_ids[j] not in held]
            if not rows:
                out.append(np.nan)
                continue
            x = np.concatenate([
                point_features(self.terms[[j]], self.layouts[self.design.sig_ids[j]], self.platform) for j in rows
            ])
            coef = relative_nnls(x, self.design.seconds[rows])
            out.append(float((point_features(self.terms[[i]], self.layouts[target], self.platform) @ coef)[0]))
        return np.maximum(np.array(out), MIN_SECONDS)

    def peers(self, target: int, held: list[int]) -> list[tuple[int, OpModel]]:
        """Measured layouts differing from the target in query heads only (one per head count)."""
        info = self.data.infos[target]
        rest = other_dims(info.config_dims)
        out: dict[int, tuple[int, OpModel]] = {}
        for s in self.sigs:
            other = self.data.infos[s]
            model = self.group.signatures.get(other.signature)
            heads = attention_field(other.config_dims, NUM_HEADS)
            if s in held or model is None or isinstance(model, BoundClassModel) or not heads:
                continue
            if other_dims(other.config_dims) == rest:
                out.setdefault(heads, (s, model))
        return [out[h] for h in sorted(out)]

    def peer_terms(self, model: OpModel, test: np.ndarray) -> np.ndarray:
        seqs = [parse_point(self.keys[i])["seqs"] for i in test]
        return term_matrix(aggregates_from_seqs(seqs, model.window, model.wave_tiles), len(seqs))

    def one_peer(self, target: int, held: list[int], test: np.ndarray, peer: int, model: OpModel,
                 regime: ClassRegressor) -> dict[str, np.ndarray]:
        ratio = self.layouts[target][0] / self.layouts[peer][0]
        terms = self.peer_terms(model, test)
        t_peer = model.predict_terms(terms)
        out = {"heads-proportional": ratio * t_peer}
        coef = peer_linear_coef(model)
        if coef is not None:
            out["heads-shared"] = heads_shared_seconds(t_peer, heads_shared_share(terms, coef), ratio)
        # The class regime-NNLS at the peer's layout: the share of its features the heads do not scale.
        static = self.data.infos[peer].static
        physical = terms[:, static.term_index] * static.multiplier
        assert regime.regime_coef is not None
        coef_r = regime.regime_coef[regime_of(terms)]
        parts = physical * coef_r
        shared_cols = [ATTENTION_FEATURES.index(n) for n in SHARED_FEATURES]
        total = parts.sum(axis=1)
        share = np.where(total > 0, parts[:, shared_cols].sum(axis=1) / np.where(total > 0, total, 1.0), 0.0)
        out["heads-shared-class"] = t_peer * (share + (1.0 - share) * ratio)
        return out

    def regime_model(self, held: list[int]) -> ClassRegressor:
        d = self.design
        train = ~np.isin(d.sig_ids, held)
        return fit_class_regressor(METHOD_REGIME, d.physical[train], d.logx[train], d.seconds[train], d.regimes[train])

    def pair_rows(self) -> list[dict]:
        """Every (held-out layout, one query-head peer) pair."""
        out = []
        for target in self.sigs:
            held = self.held_out(target)
            peers = self.peers(target, held)
            if not peers:
                continue
            test = np.flatnonzero(self.design.sig_ids == target)
            seconds = self.design.seconds[test]
            base = self.class_fit(self.unseen_method, held)[test]
            regime = self.regime_model(held)
            heads = self.layouts[target][0]
            for peer, model in peers:
                peer_heads = self.layouts[peer][0]
                # The product with that peer alone: every other query-head peer held out too.
                others = [p for p, _ in peers if p != peer]
                product = self.heads_affine(target, held + others, test, ONE_PEER_METHODS[self.data.key[2]])
                predictions = {"class": base, **self.one_peer(target, held, test, peer, model, regime),
                               "product": product}
                row = {"backend": self.data.key[2], "layout": self.layouts[target], "heads": heads,
                       "peer_layout": self.layouts[peer], "peer_heads": peer_heads,
                       "within_extrapolation": bool(max(heads, peer_heads) <= MAX_HEADS_EXTRAPOLATION
                                                    * min(heads, peer_heads)),
                       "signature": self.data.infos[target].signature,
                       "peer_signature": self.data.infos[peer].signature, "points": len(test)}
                for name in ONE_PEER_SCHEMES:
                    predicted = predictions.get(name)
                    row[name] = None if predicted is None else errors(np.maximum(predicted, MIN_SECONDS), seconds)
                log.info("%s %s <- %s %s", row["backend"], row["layout"], peer_heads,
                         {k: None if row[k] is None else round(row[k]["weighted_pct"], 1) for k in ONE_PEER_SCHEMES})
                out.append(row)
        return out

    def rows(self) -> list[dict]:
        out = []
        for target in self.sigs:
            held = self.held_out(target)
            test = np.flatnonzero(self.design.sig_ids == target)
            seconds = self.design.seconds[test]
            predictions = {
                "class": self.class_fit(self.unseen_method, held)[test],
                "heads-affine": self.heads_affine(target, held, test),
                "nearest-ratio": self.nearest_ratio(target, held, test),
                "point-nnls": self.point_nnls(target, held, test),
                "heads-proportional": self.heads_affine(target, held, test, METHOD_HEADS_PROPORTIONAL),
                "heads-shared": self.heads_affine(target, held, test, METHOD_HEADS_SHARED),
                "layout-scaled": self.layout_scaled(target, held, test),
            }
            row = {"backend": self.data.key[2], "layout": self.layouts[target],
                   "heads": attention_field(self.data.infos[target].config_dims, NUM_HEADS),
                   "signature": self.data.infos[target].signature, "points": len(test)}
            for name, predicted in predictions.items():
                measured = None if predicted is None else np.isfinite(predicted)
                row[name] = None if predicted is None else errors(predicted[measured], seconds[measured])
            log.info("%s %s %s", row["backend"], row["layout"],
                     {k: None if row[k] is None else round(row[k]["weighted_pct"], 1) for k in SCHEMES})
            out.append(row)
        return out


def study_rows(fitted: Path, platform: str = PLATFORM) -> tuple[list[dict], list[dict]]:
    store = open_store(str(fitted))
    frame, _ = read_snapshot(store)
    meta = read_meta(store, latest_meta_key(store))
    out: list[dict] = []
    pairs: list[dict] = []
    for data in group_data(training_rows(frame)):
        group_platform, engine, backend, dtype = data.key
        if group_platform != platform or backend not in BACKENDS:
            continue
        op_class = ATTENTION_PREFIX + backend
        design = class_design(data, op_class, np.flatnonzero(data.row_class == op_class))
        group, _ = load_group(store, platform=platform, engine=engine, backend=backend, dtype=dtype)
        method = next(c["unseen_method"] for g in meta["groups"] if g["backend"] == backend
                      for c in g["classes"] if c["op_class"] == op_class)
        study = Study(data, design, group, method, platform)
        out += study.rows()
        pairs += study.pair_rows()
    return out, pairs


def cell(value: dict | None) -> str:
    if value is None:
        return "-"
    return f"{value['weighted_pct']:.1f}% ({value['bias_pct']:+.1f}%) / {value['mape_pct']:.1f}%"


def layout_name(layout: Layout) -> str:
    q, kv, dim, window = layout
    return f"{q}/{kv}/{dim}" + (f" w{window}" if window else "")


def pair_table(pairs: list[dict]) -> str:
    """Markdown: per (held-out layout, one peer), each one-peer scheme; then per backend the mean
    of each scheme's time-weighted error and |bias| over the pairs within MAX_HEADS_EXTRAPOLATION."""
    lines = ["One query-head peer: each cell time-weighted error (bias) / MAPE over the held-out layout's grid "
             "points; `*`: the peer is beyond MAX_HEADS_EXTRAPOLATION.", "",
             "| backend | layout | peer heads | " + " | ".join(ONE_PEER_SCHEMES) + " |",
             "|---|---|---:|" + "---:|" * len(ONE_PEER_SCHEMES)]
    for row in pairs:
        star = "" if row["within_extrapolation"] else "*"
        lines.append(f"| {row['backend']} | {layout_name(row['layout'])} | {row['peer_heads']}{star} | "
                     + " | ".join(cell(row[s]) for s in ONE_PEER_SCHEMES) + " |")
    lines += ["", "Mean over the pairs within MAX_HEADS_EXTRAPOLATION: time-weighted error / |bias| / MAPE.", "",
              "| backend | pairs | " + " | ".join(ONE_PEER_SCHEMES) + " |", "|---|---:|" + "---:|" * len(ONE_PEER_SCHEMES)]
    for backend in BACKENDS:
        rows = [r for r in pairs if r["backend"] == backend and r["within_extrapolation"]]
        if not rows:
            continue
        cells = []
        for s in ONE_PEER_SCHEMES:
            got = [r[s] for r in rows if r[s] is not None]
            cells.append(f"{np.mean([g['weighted_pct'] for g in got]):.1f}% / {np.mean([abs(g['bias_pct']) for g in got]):.1f}%"
                         f" / {np.mean([g['mape_pct'] for g in got]):.1f}%")
        lines.append(f"| {backend} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    """Markdown: per layout, each scheme's time-weighted error (bias) and MAPE."""

    lines = ["Each cell: time-weighted error (bias) / MAPE over the layout's grid points, held out.", "",
             "| backend | layout (q / kv / dim) | " + " | ".join(SCHEMES) + " |",
             "|---|---|" + "---:|" * len(SCHEMES)]
    for row in rows:
        lines.append(f"| {row['backend']} | {layout_name(row['layout'])} | " + " | ".join(cell(row[s]) for s in SCHEMES) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True, help="A fitted store (the H100's by default).")
    parser.add_argument("--platform", default=PLATFORM, help=f"The store's platform to study [default: {PLATFORM}].")
    parser.add_argument("--out", type=Path, required=True, help="JSON result; a .md table beside it.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rows, pairs = study_rows(args.store, args.platform)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"signatures": rows, "one_peer": pairs}, indent=1) + "\n")
    text = table(rows) + "\n\n" + pair_table(pairs) + "\n"
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

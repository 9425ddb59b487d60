"""Predictions for operation classes a platform never measured: the family fallback.

A model the database has never run can bring an operation class no profiled model uses (a MoE
router's `aten.sigmoid`, a LayerNorm, a GELU). Such an op gets no class regressor, but it is not
unknowable: an elementwise or reduction op costs what moving its elements costs on that GPU, a
GEMM-like op what its FLOPs and bytes cost. Each family gets one estimator, fitted on every
measured signature of the family on that platform/engine/backend/dtype, pooled across classes:
- generic (memory-bound) ops: the platform's latency-vs-elements curve, the median over measured
  ops of log seconds in each octave of elements touched (elements per request unit from the
  config dims, times the request size), made non-decreasing and interpolated in log-log. A
  median, because a pooled least squares is dragged by the odd class (an `empty_like` that moves
  nothing, an `embedding` whose table is not read in full): measured by leaving each class out,
  the relative NNLS over the class regressors' physical features missed by ~98% (median over
  classes), the curve by far less (bench/fallback_holdout.py, docs/unseen.md);
- matmul: relative-error NNLS over the matmul physical features (FLOPs and bytes per request
  unit, dooly.fit.features.static_features), linear in the request terms.

Training points are the measured signatures' own fitted models evaluated on a ladder of request
sizes (their seen models interpolate the measurements, so no snapshot needs reading at predict
time); a measured signature's config dims come from the store's inventories.

Held-out check (`holdout_by_class`, bench/fallback_holdout.py): each measured class in turn is
left out, the family regressor refitted on the others, and the class's signatures predicted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dooly.fit.features import (
    FAMILY_ATTENTION,
    FAMILY_GENERIC,
    FAMILY_MATMUL,
    MATMUL_OPS,
    N_TERMS,
    TERM_INDEX,
    _input_sizes,
    family_of,
    physical_design,
    product_term,
    static_features,
    term_matrix,
)
from dooly.fit.regressors import MIN_SECONDS, LinearModel, OpModel, relative_nnls

logger = logging.getLogger(__name__)

METHOD_FALLBACK = "family-fallback"
# Request sizes the measured models are sampled at: powers of two, 1 to 8192 tokens/sequences.
LADDER = 2.0 ** np.arange(0, 14)
# Families with a fallback of their own; any other (collectives) borrows the generic one.
FALLBACK_FAMILIES = (FAMILY_GENERIC, FAMILY_MATMUL)
PERCENT = 100.0
# The generic curve's bins: this many per doubling of elements; a bin needs this many points.
BINS_PER_OCTAVE = 1
MIN_BIN_POINTS = 3
METHOD_GENERIC_CURVE = "elements-curve"
METHOD_GENERIC_NNLS = "physical-nnls"


@dataclass
class ElementsCurveModel(OpModel):
    """seconds = the platform's generic-op curve at (elements per request unit x request product)."""

    elements_per_unit: float = 1.0
    term: str = "const"
    log2_elements: np.ndarray = field(default_factory=lambda: np.zeros(1))
    log_seconds: np.ndarray = field(default_factory=lambda: np.zeros(1))

    def predict_terms(self, terms: np.ndarray) -> np.ndarray:
        size = np.maximum(self.elements_per_unit * terms[:, TERM_INDEX[self.term]], 1.0)
        out = np.exp(np.interp(np.log2(size), self.log2_elements, self.log_seconds))
        out[terms[:, TERM_INDEX[self.term]] <= 0] = 0.0
        return out


def elements_per_unit(config_dims: Mapping[str, int]) -> float:
    """Elements an op touches per unit of its request product: its inputs' config-fixed sizes."""
    sizes = _input_sizes(config_dims)
    return float(sum(sizes)) if sizes else 1.0


def _request_term(request_vars: tuple[str, ...]) -> str:
    term = product_term(request_vars)
    return "const" if term == "zero" else term


@dataclass(frozen=True)
class Sample:
    """One measured signature as the fallback learns from it."""

    signature: str
    op: str
    op_class: str
    family: str
    config_dims: dict[str, int]
    request_vars: tuple[str, ...]


@dataclass
class FamilyFallback:
    """The generic curve and the matmul regressor (see module doc)."""

    coef: dict[str, np.ndarray]
    classes: dict[str, list[str]]
    curve: tuple[np.ndarray, np.ndarray] | None = None

    def model(self, signature: str, op: str, op_class: str, config_dims: Mapping[str, int],
              request_vars: tuple[str, ...]) -> OpModel | None:
        """A model over request terms for one operation of a class never measured."""
        family = fallback_family(op_class, op)
        if family == FAMILY_GENERIC and self.curve is not None:
            return ElementsCurveModel(
                signature=signature, op=op or op_class, op_class=op_class, family=family, request_vars=request_vars,
                window=0, method=f"{METHOD_FALLBACK}:{METHOD_GENERIC_CURVE}", wave_tiles=0.0,
                elements_per_unit=elements_per_unit(config_dims), term=_request_term(request_vars),
                log2_elements=self.curve[0], log_seconds=self.curve[1],
            )
        coef = self.coef.get(family)
        if coef is None:
            return None
        static = static_features(family, _op_name(family, op, op_class), config_dims, request_vars)
        term_coef = np.zeros(N_TERMS)
        np.add.at(term_coef, static.term_index, coef * static.multiplier)
        return LinearModel(
            signature=signature, op=op or op_class, op_class=op_class, family=family, request_vars=request_vars,
            window=0, method=METHOD_FALLBACK, wave_tiles=0.0, coef=term_coef,
        )


def fallback_family(op_class: str, op: str = "") -> str:
    """The fallback family of an op class: matmul for matrix products, else generic (attention
    has its own class regressors on every backend that serves it; collectives move bytes)."""
    family = family_of(op_class, op)
    return family if family in FALLBACK_FAMILIES else FAMILY_GENERIC


def _op_name(family: str, op: str, op_class: str) -> str:
    name = op or op_class
    if family == FAMILY_MATMUL and name not in MATMUL_OPS:
        name = op_class
    return name


def samples_from_inventories(signatures: Iterable[str], inventories: Iterable[Mapping[str, Any]]) -> list[Sample]:
    """The measured SIGNATURES with their config dims, as the inventories list them (single-
    variable, non-attention ops only: the ladder is one variable)."""
    wanted = set(signatures)
    found: dict[str, Sample] = {}
    for inventory in inventories:
        for entry in inventory.get("operations", []):
            signature = entry.get("signature")
            if signature not in wanted or signature in found:
                continue
            op_class = str(entry.get("op_class", ""))
            op = str(entry.get("op", "") or op_class)
            family = family_of(op_class, op)
            variables = tuple(entry.get("request_vars") or ())
            if family not in FALLBACK_FAMILIES or len(variables) != 1:
                continue
            found[signature] = Sample(
                signature=signature, op=op, op_class=op_class, family=family,
                config_dims={str(k): int(v) for k, v in (entry.get("config_dims") or {}).items() if v is not None},
                request_vars=variables,
            )
    return list(found.values())


def _design(sample: Sample, model: OpModel) -> tuple[np.ndarray, np.ndarray]:
    """Physical features and the measured model's seconds on the ladder, for one signature."""
    terms = term_matrix({sample.request_vars[0]: LADDER}, len(LADDER))
    static = static_features(sample.family, _op_name(sample.family, sample.op, sample.op_class),
                             sample.config_dims, sample.request_vars)
    n = len(LADDER)
    physical = physical_design(terms, np.tile(static.term_index, (n, 1)), np.tile(static.multiplier, (n, 1)))
    seconds = np.maximum(np.asarray(model.predict_terms(terms), dtype=np.float64), MIN_SECONDS)
    return physical, seconds


def generic_curve(models: Mapping[str, OpModel], samples: list[Sample]) -> tuple[np.ndarray, np.ndarray] | None:
    """The platform's generic-op curve: per octave of elements, the median log seconds of the
    measured generic ops there; non-decreasing, since touching more elements never costs less."""
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for sample in samples:
        if sample.family != FAMILY_GENERIC or sample.signature not in models:
            continue
        terms = term_matrix({sample.request_vars[0]: LADDER}, len(LADDER))
        seconds = np.maximum(np.asarray(models[sample.signature].predict_terms(terms), dtype=np.float64), MIN_SECONDS)
        xs.append(np.log2(np.maximum(elements_per_unit(sample.config_dims) * LADDER, 1.0)))
        ys.append(np.log(seconds))
    if not xs:
        return None
    x = np.concatenate(xs)
    y = np.concatenate(ys)
    bins = np.round(x * BINS_PER_OCTAVE) / BINS_PER_OCTAVE
    centres = []
    medians = []
    for b in np.unique(bins):
        chosen = bins == b
        if chosen.sum() >= MIN_BIN_POINTS:
            centres.append(float(b))
            medians.append(float(np.median(y[chosen])))
    if not centres:
        return None
    return np.array(centres), np.maximum.accumulate(np.array(medians))


def fit_fallback(models: Mapping[str, OpModel], samples: list[Sample], *, generic: str = METHOD_GENERIC_CURVE) -> FamilyFallback:
    """The family estimators, fitted on every sample whose measured model is in MODELS
    (`generic`: the curve, or METHOD_GENERIC_NNLS, the candidate it was measured against)."""
    coef: dict[str, np.ndarray] = {}
    classes: dict[str, list[str]] = {}
    curve = generic_curve(models, samples) if generic == METHOD_GENERIC_CURVE else None
    for family in FALLBACK_FAMILIES:
        rows = [(s, models[s.signature]) for s in samples if s.family == family and s.signature in models]
        if not rows:
            continue
        parts = [_design(s, m) for s, m in rows]
        coef[family] = relative_nnls(np.vstack([p for p, _ in parts]), np.concatenate([y for _, y in parts]))
        classes[family] = sorted({s.op_class for s, _ in rows})
        logger.debug("fallback %s: %d signatures of %d classes", family, len(rows), len(classes[family]))
    return FamilyFallback(coef=coef, classes=classes, curve=curve)


def holdout_by_class(
    models: Mapping[str, OpModel], samples: list[Sample], *, generic: str = METHOD_GENERIC_CURVE
) -> list[dict[str, Any]]:
    """Leave each measured class out: refit its family's fallback on the other classes, predict
    the class's signatures on the ladder against their own models. One row per class: its
    family, signatures, and the median over its signatures of the per-signature MAPE."""
    rows = []
    for op_class in sorted({s.op_class for s in samples if s.signature in models}):
        held = [s for s in samples if s.op_class == op_class and s.signature in models]
        rest = [s for s in samples if s.op_class != op_class]
        fallback = fit_fallback(models, rest, generic=generic)
        errors = []
        for sample in held:
            model = fallback.model(sample.signature, sample.op, sample.op_class, sample.config_dims, sample.request_vars)
            if model is None:
                continue
            terms = term_matrix({sample.request_vars[0]: LADDER}, len(LADDER))
            truth = np.maximum(models[sample.signature].predict_terms(terms), MIN_SECONDS)
            predicted = np.maximum(model.predict_terms(terms), MIN_SECONDS)
            errors.append(float(np.mean(np.abs(predicted / truth - 1.0)) * PERCENT))
        rows.append({"op_class": op_class, "family": held[0].family, "signatures": len(held),
                     "mape_median_pct": float(np.median(errors)) if errors else None})
    return rows


def is_attention(op_class: str, op: str = "") -> bool:
    return family_of(op_class, op) == FAMILY_ATTENTION

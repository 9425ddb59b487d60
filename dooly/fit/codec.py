"""Fitted models as data: a GroupModel to a JSON document and back, without pickle.

A store is shared (a bucket many people and jobs write to), so reading it must never run what it
holds: a pickle executes whatever its bytes ask for, and it ties every reader to the writer's
scikit-learn. Every model here is already plain numbers (curves, NNLS coefficients, flattened
trees, tabulated tree corrections; regressors.py evaluates them with numpy), so a group is stored
as one JSON document:

    {"schema": "dooly.fitted-group", "format": 4, "platform": ..., "engine": ..., "backend": ...,
     "dtype": ..., "generation": N,
     "classes": [{"kind": "class-model", ...}, ...],
     "signatures": [{"kind": "interp" | "linear" | "regime-linear" | "corrected-linear" |
                     "bound-class", ...}, ...],
     "reports": [...],
     "measured_extents": {signature: {regime: {variable: largest measured value}}}}

Each model kind has an explicit encoder and decoder; the decoder of a document looks its `kind`
up in a closed table (`OP_DECODERS`), so a document can only ever build the classes listed there.
Arrays are {"dtype": "float64" | "int64", "shape": [...], "values": [...]} with the values flat
and in C order: JSON writes a float64 by its shortest repr, which reads back to the same double,
so every array round-trips bit for bit; the non-finite values JSON lacks (a tree leaf's +inf
threshold) are the strings "inf", "-inf" and "nan". docs/fit.md documents the format.

Nothing here imports scikit-learn.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from dooly.errors import DoolyError
from dooly.fit.curves import Alignment, Curve
from dooly.fit.extent import MeasuredExtent
from dooly.fit.features import StaticFeatures
from dooly.fit.group import GroupModel
from dooly.fit.regressors import (
    BoundClassModel,
    ClassModel,
    ClassRegressor,
    CorrectedLinearModel,
    InterpModel,
    LinearModel,
    OpModel,
    PairTables,
    RegimeLinearModel,
    TreeEnsemble,
)

GROUP_SCHEMA = "dooly.fitted-group"
# Bumped when a document changes shape; readers refuse other versions with one line (format 3 and
# before were joblib pickles).
FORMAT_VERSION = 4

KIND_INTERP = "interp"
KIND_LINEAR = "linear"
KIND_REGIME_LINEAR = "regime-linear"
KIND_CORRECTED_LINEAR = "corrected-linear"
KIND_BOUND_CLASS = "bound-class"
KIND_CLASS_MODEL = "class-model"

# The two element types arrays may have; anything else in a document is refused.
FLOAT = "float64"
INT = "int64"
DTYPES: dict[str, type] = {FLOAT: np.float64, INT: np.int64}
# JSON has no non-finite numbers: these strings stand for them in a float array.
NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


T = TypeVar("T")


class CodecError(DoolyError):
    """A document that is not a fitted group this Dooly can read (the caller names the file)."""


# ---------------------------------------------------------------------------------------------
# Arrays and scalars


def encode_array(array: np.ndarray) -> dict[str, Any]:
    """An int or float array as {"dtype", "shape", "values"} (exact; see the module docstring)."""
    array = np.asarray(array)
    if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        return {"dtype": INT, "shape": list(array.shape), "values": array.astype(np.int64).ravel().tolist()}
    flat = array.astype(np.float64).ravel()
    values: list[Any] = flat.tolist()
    if not np.isfinite(flat).all():
        values = [v if math.isfinite(v) else _non_finite_token(v) for v in values]
    return {"dtype": FLOAT, "shape": list(array.shape), "values": values}


def _non_finite_token(value: float) -> str:
    if math.isnan(value):
        return "nan"
    return "inf" if value > 0 else "-inf"


def decode_array(payload: Any, dtype: str | None = None) -> np.ndarray:
    """The array of `encode_array`; `dtype` (when given) is the element type the field must have."""
    if not isinstance(payload, Mapping):
        raise CodecError(f"expected an array object, got {type(payload).__name__}")
    kind = payload.get("dtype")
    if kind not in DTYPES or (dtype is not None and kind != dtype):
        raise CodecError(f"array of dtype {kind!r} where {dtype or ' or '.join(DTYPES)} was expected")
    shape = payload.get("shape")
    values = payload.get("values")
    if not isinstance(shape, list) or not isinstance(values, list):
        raise CodecError("array without a shape list and a values list")
    # One pass in C: numbers come back as an int or float array, anything else as strings or
    # objects (a string other than a non-finite token, a nested list, a null) and is refused.
    try:
        array = np.array(values)
    except ValueError as exc:
        raise CodecError(f"array values are not {kind}") from exc
    if array.dtype.kind == "U" and kind == FLOAT:
        if not all(isinstance(v, (int, float)) or v in NON_FINITE for v in values):
            raise CodecError(f"array values are not {kind}")
        array = np.array([NON_FINITE[v] if isinstance(v, str) else v for v in values], dtype=np.float64)
    allowed = "iu" if kind == INT else "iuf"
    if array.dtype.kind not in allowed and array.size:
        raise CodecError(f"array values are not {kind}")
    array = array.astype(DTYPES[kind], copy=False)
    if array.ndim != 1 or array.size != math.prod(shape):
        raise CodecError(f"array of {array.size} values cannot have shape {shape}")
    return array.reshape(shape)


def _text(payload: Mapping[str, Any], name: str) -> str:
    value = payload[name]
    if not isinstance(value, str):
        raise CodecError(f"field {name!r} is not a string")
    return value


def _texts(payload: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = payload[name]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CodecError(f"field {name!r} is not a list of strings")
    return tuple(value)


def _number(payload: Mapping[str, Any], name: str) -> float:
    value = payload[name]
    if isinstance(value, str) and value in NON_FINITE:
        return NON_FINITE[value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CodecError(f"field {name!r} is not a number")
    return float(value)


def _scalar(value: float) -> float | str:
    value = float(value)
    return value if math.isfinite(value) else _non_finite_token(value)


def _integer(payload: Mapping[str, Any], name: str) -> int:
    value = payload[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise CodecError(f"field {name!r} is not an integer")
    return value


# ---------------------------------------------------------------------------------------------
# Building blocks: curves, trees, tables, class regressors


def encode_curve(curve: Curve) -> dict[str, Any]:
    return {
        "knot_x": encode_array(curve.knot_x),
        "knot_log_y": encode_array(curve.knot_log_y),
        "knot_slope": encode_array(curve.knot_slope),
        "measured_log_y": encode_array(curve.measured_log_y),
        "high_slope": _scalar(curve.high_slope),
        "alignment": (
            None
            if curve.alignment is None
            else {"unit": int(curve.alignment.unit), "granule": int(curve.alignment.granule)}
        ),
        "partial_s": _scalar(curve.partial_s),
    }


def decode_curve(payload: Mapping[str, Any]) -> Curve:
    alignment = payload["alignment"]
    return Curve(
        knot_x=decode_array(payload["knot_x"], FLOAT),
        knot_log_y=decode_array(payload["knot_log_y"], FLOAT),
        knot_slope=decode_array(payload["knot_slope"], FLOAT),
        measured_log_y=decode_array(payload["measured_log_y"], FLOAT),
        high_slope=_number(payload, "high_slope"),
        alignment=(
            None
            if alignment is None
            else Alignment(unit=_integer(alignment, "unit"), granule=_integer(alignment, "granule"))
        ),
        partial_s=_number(payload, "partial_s"),
    )


TREE_INT_FIELDS = ("feature", "left", "right", "roots")
TREE_FLOAT_FIELDS = ("threshold", "value")


def encode_trees(trees: TreeEnsemble) -> dict[str, Any]:
    out: dict[str, Any] = {"baseline": _scalar(trees.baseline), "depth": int(trees.depth)}
    for name in (*TREE_INT_FIELDS, *TREE_FLOAT_FIELDS):
        out[name] = encode_array(getattr(trees, name))
    return out


def decode_trees(payload: Mapping[str, Any]) -> TreeEnsemble:
    arrays = {name: decode_array(payload[name], INT) for name in TREE_INT_FIELDS}
    arrays.update({name: decode_array(payload[name], FLOAT) for name in TREE_FLOAT_FIELDS})
    nodes = len(arrays["threshold"])
    if any(len(a) != nodes for n, a in arrays.items() if n != "roots") or (
        nodes and not all(0 <= int(a.min()) and int(a.max()) < nodes for n, a in arrays.items() if n in TREE_INT_FIELDS[1:])
    ):
        raise CodecError("tree ensemble arrays of unequal lengths or node indices out of range")
    return TreeEnsemble(baseline=_number(payload, "baseline"), depth=_integer(payload, "depth"), **arrays)


def encode_tables(tables: PairTables) -> dict[str, Any]:
    return {
        "names": list(tables.names),
        "splits": [encode_array(s) for s in tables.splits],
        "pairs": [[int(a), int(b)] for a, b in tables.pairs],
        "factors": [encode_array(f) for f in tables.factors],
    }


def decode_tables(payload: Mapping[str, Any]) -> PairTables:
    names = _texts(payload, "names")
    pairs = payload["pairs"]
    if not isinstance(pairs, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(i, int) and 0 <= i < len(names) for i in p)
        for p in pairs
    ):
        raise CodecError("pair tables with pairs that are not index pairs into their names")
    splits = tuple(decode_array(s, FLOAT) for s in payload["splits"])
    factors = tuple(decode_array(f, FLOAT) for f in payload["factors"])
    if len(splits) != len(names) or len(factors) != len(pairs):
        raise CodecError("pair tables with a split list per name and a table per pair expected")
    for (a, b), table in zip(pairs, factors, strict=True):
        if table.shape != (len(splits[a]) + 1, len(splits[b]) + 1):
            raise CodecError("a pair table whose shape does not match its split points")
    return PairTables(names=names, splits=splits, pairs=tuple((a, b) for a, b in pairs), factors=factors)


def _optional(value: Any, encode: Callable[[Any], Any]) -> Any:
    return None if value is None else encode(value)


def _optional_decoded(payload: Mapping[str, Any], name: str, decode: Callable[[Any], Any]) -> Any:
    value = payload.get(name)
    return None if value is None else decode(value)


def encode_regressor(regressor: ClassRegressor) -> dict[str, Any]:
    return {
        "method": regressor.method,
        "coef": _optional(regressor.coef, encode_array),
        "regime_coef": _optional(regressor.regime_coef, encode_array),
        "trees": _optional(regressor.trees, encode_trees),
        "log_coef": _optional(regressor.log_coef, encode_array),
        "log_intercept": _scalar(regressor.log_intercept),
    }


def decode_regressor(payload: Mapping[str, Any]) -> ClassRegressor:
    return ClassRegressor(
        method=_text(payload, "method"),
        coef=_optional_decoded(payload, "coef", lambda p: decode_array(p, FLOAT)),
        regime_coef=_optional_decoded(payload, "regime_coef", lambda p: decode_array(p, FLOAT)),
        trees=_optional_decoded(payload, "trees", decode_trees),
        log_coef=_optional_decoded(payload, "log_coef", lambda p: decode_array(p, FLOAT)),
        log_intercept=_number(payload, "log_intercept"),
    )


def _seqs(value: Any) -> list:
    """Measured attention batches: lists of [new tokens, context] pairs of integers."""
    if not isinstance(value, list) or not all(
        isinstance(batch, list)
        and all(isinstance(pair, list) and len(pair) == 2 and all(isinstance(i, int) for i in pair) for pair in batch)
        for batch in value
    ):
        raise CodecError("reference_seqs is not a list of [[q, ctx], ...] batches")
    return value


def encode_class_model(model: ClassModel) -> dict[str, Any]:
    return {
        "kind": KIND_CLASS_MODEL,
        "op_class": model.op_class,
        "family": model.family,
        "config_names": list(model.config_names),
        "request_vars": list(model.request_vars),
        "regressor": encode_regressor(model.regressor),
        "reference_seqs": [[[int(q), int(c)] for q, c in batch] for batch in model.reference_seqs],
        "reference_terms": encode_array(model.reference_terms),
        "layouts": {signature: dict(config) for signature, config in sorted(model.layouts.items())},
    }


def decode_class_model(payload: Mapping[str, Any]) -> ClassModel:
    if payload.get("kind") != KIND_CLASS_MODEL:
        raise CodecError(f"class entry of kind {payload.get('kind')!r}, expected {KIND_CLASS_MODEL!r}")
    return ClassModel(
        op_class=_text(payload, "op_class"),
        family=_text(payload, "family"),
        config_names=_texts(payload, "config_names"),
        request_vars=_texts(payload, "request_vars"),
        regressor=decode_regressor(payload["regressor"]),
        reference_seqs=_seqs(payload["reference_seqs"]),
        reference_terms=decode_array(payload["reference_terms"], FLOAT),
        layouts=_layouts(payload.get("layouts", {})),
    )


def _layouts(value: Any) -> dict[str, dict[str, int]]:
    """Measured attention layouts: config dims (names to integers) by signature. Absent in files
    written before them: an empty table, with which unseen layouts use the class regressor alone."""
    if not isinstance(value, dict) or not all(
        isinstance(signature, str)
        and isinstance(config, dict)
        and all(isinstance(name, str) and isinstance(dim, int) and not isinstance(dim, bool) for name, dim in config.items())
        for signature, config in value.items()
    ):
        raise CodecError("layouts is not an object of signatures to config dims (names to integers)")
    return {signature: dict(config) for signature, config in value.items()}


def _extents(value: Any) -> dict[str, MeasuredExtent]:
    """Measured extents: per signature, per regime name, the largest value of each variable.
    Absent in files written before them: an empty table, with which coverage reports no
    extrapolation (it cannot tell)."""
    if not isinstance(value, dict) or not all(
        isinstance(signature, str)
        and isinstance(by_regime, dict)
        and all(
            isinstance(regime, str)
            and isinstance(maxima, dict)
            and all(isinstance(var, str) and isinstance(top, int) and not isinstance(top, bool) for var, top in maxima.items())
            for regime, maxima in by_regime.items()
        )
        for signature, by_regime in value.items()
    ):
        raise CodecError("measured_extents is not an object of signatures to regimes to variables' maxima (integers)")
    return {
        signature: MeasuredExtent({regime: dict(maxima) for regime, maxima in by_regime.items()})
        for signature, by_regime in value.items()
    }


# ---------------------------------------------------------------------------------------------
# Per-signature models


def _common(model: OpModel, kind: str) -> dict[str, Any]:
    """The fields every OpModel has."""
    return {
        "kind": kind,
        "signature": model.signature,
        "op": model.op,
        "op_class": model.op_class,
        "family": model.family,
        "request_vars": list(model.request_vars),
        "window": int(model.window),
        "method": model.method,
        "wave_tiles": _scalar(model.wave_tiles),
    }


def _common_fields(payload: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "signature": _text(payload, "signature"),
        "op": _text(payload, "op"),
        "op_class": _text(payload, "op_class"),
        "family": _text(payload, "family"),
        "request_vars": _texts(payload, "request_vars"),
        "window": _integer(payload, "window"),
        "method": _text(payload, "method"),
        "wave_tiles": _number(payload, "wave_tiles"),
    }


def encode_op_model(model: OpModel, classes: Mapping[str, ClassModel]) -> dict[str, Any]:
    """One signature's model. A bound class model refers to its class model by op class (the
    group holds it once): it must be the group's model of that class."""
    # Exact types: a subclass unknown here must not pass as its parent.
    if type(model) is InterpModel:
        return {**_common(model, KIND_INTERP), "variable": model.variable, "curve": encode_curve(_needed(model.curve))}
    if type(model) is LinearModel:
        return {**_common(model, KIND_LINEAR), "coef": encode_array(model.coef)}
    if type(model) is RegimeLinearModel:
        return {**_common(model, KIND_REGIME_LINEAR), "regime_coef": encode_array(model.regime_coef)}
    if type(model) is CorrectedLinearModel:
        return {
            **_common(model, KIND_CORRECTED_LINEAR),
            "coef": encode_array(model.coef),
            "tables": encode_tables(_needed(model.tables)),
        }
    if type(model) is BoundClassModel:
        class_model = _needed(model.model)
        static = _needed(model.static)
        if classes.get(class_model.op_class) is not class_model:
            raise ValueError(f"{model.signature}: its class model is not the group's {class_model.op_class}")
        return {
            **_common(model, KIND_BOUND_CLASS),
            "class_model": class_model.op_class,
            "static": {
                "term_index": encode_array(static.term_index),
                "multiplier": encode_array(static.multiplier),
                "window": int(static.window),
                "wave_tiles": _scalar(static.wave_tiles),
            },
            "config": encode_array(model.config),
            "var_mask": encode_array(model.var_mask),
            "factor": _scalar(model.factor),
        }
    raise ValueError(f"no encoding for a {type(model).__name__} ({model.signature})")


def _needed(value: T | None) -> T:
    """A part every fitted model of its kind has (the dataclasses default it to None)."""
    if value is None:
        raise ValueError("a fitted model lacks a part its kind needs")
    return value


def _decode_interp(payload: Mapping[str, Any], _: Mapping[str, ClassModel]) -> OpModel:
    return InterpModel(
        **_common_fields(payload), variable=_text(payload, "variable"), curve=decode_curve(payload["curve"])
    )


def _decode_linear(payload: Mapping[str, Any], _: Mapping[str, ClassModel]) -> OpModel:
    return LinearModel(**_common_fields(payload), coef=decode_array(payload["coef"], FLOAT))


def _decode_regime_linear(payload: Mapping[str, Any], _: Mapping[str, ClassModel]) -> OpModel:
    return RegimeLinearModel(**_common_fields(payload), regime_coef=decode_array(payload["regime_coef"], FLOAT))


def _decode_corrected_linear(payload: Mapping[str, Any], _: Mapping[str, ClassModel]) -> OpModel:
    return CorrectedLinearModel(
        **_common_fields(payload),
        coef=decode_array(payload["coef"], FLOAT),
        tables=decode_tables(payload["tables"]),
    )


def _decode_bound_class(payload: Mapping[str, Any], classes: Mapping[str, ClassModel]) -> OpModel:
    name = _text(payload, "class_model")
    if name not in classes:
        raise CodecError(f"{payload.get('signature')}: refers to class model {name!r}, which the group lacks")
    static = payload["static"]
    return BoundClassModel(
        **_common_fields(payload),
        model=classes[name],
        static=StaticFeatures(
            term_index=decode_array(static["term_index"], INT),
            multiplier=decode_array(static["multiplier"], FLOAT),
            window=_integer(static, "window"),
            wave_tiles=_number(static, "wave_tiles"),
        ),
        config=decode_array(payload["config"], FLOAT),
        var_mask=decode_array(payload["var_mask"], FLOAT),
        factor=_number(payload, "factor"),
    )


# The closed set of per-signature model kinds a document may hold.
OP_DECODERS: dict[str, Callable[[Mapping[str, Any], Mapping[str, ClassModel]], OpModel]] = {
    KIND_INTERP: _decode_interp,
    KIND_LINEAR: _decode_linear,
    KIND_REGIME_LINEAR: _decode_regime_linear,
    KIND_CORRECTED_LINEAR: _decode_corrected_linear,
    KIND_BOUND_CLASS: _decode_bound_class,
}


def decode_op_model(payload: Mapping[str, Any], classes: Mapping[str, ClassModel]) -> OpModel:
    if not isinstance(payload, Mapping):
        raise CodecError("a signature entry is not an object")
    decoder = OP_DECODERS.get(payload.get("kind"))  # type: ignore[arg-type]
    if decoder is None:
        raise CodecError(
            f"unknown model kind {payload.get('kind')!r} (known: {', '.join(OP_DECODERS)})"
        )
    return decoder(payload, classes)


# ---------------------------------------------------------------------------------------------
# Groups


def encode_group(group: GroupModel) -> dict[str, Any]:
    """A group as a JSON-ready document (see the module docstring)."""
    return {
        "schema": GROUP_SCHEMA,
        "format": FORMAT_VERSION,
        "platform": group.platform,
        "engine": group.engine,
        "backend": group.backend,
        "dtype": group.dtype,
        "generation": int(group.generation),
        "classes": [encode_class_model(m) for m in group.classes.values()],
        "signatures": [encode_op_model(m, group.classes) for m in group.signatures.values()],
        "reports": group.reports,
        "measured_extents": {signature: extent.to_json() for signature, extent in sorted(group.extents.items())},
    }


def check_document(payload: Any) -> Mapping[str, Any]:
    """The document itself when it is a fitted group of this format, else CodecError."""
    if not isinstance(payload, Mapping) or payload.get("schema") != GROUP_SCHEMA:
        raise CodecError(f"not a {GROUP_SCHEMA} document")
    if payload.get("format") != FORMAT_VERSION:
        raise CodecError(f"{GROUP_SCHEMA} format {payload.get('format')}, this Dooly reads {FORMAT_VERSION}")
    return payload


def decode_group(payload: Any) -> GroupModel:
    """The GroupModel of a document of `encode_group`; CodecError (one line) when it is not one."""
    document = check_document(payload)
    try:
        classes: dict[str, ClassModel] = {}
        for entry in document["classes"]:
            model = decode_class_model(entry)
            classes[model.op_class] = model
        signatures = {}
        for entry in document["signatures"]:
            model_op = decode_op_model(entry, classes)
            signatures[model_op.signature] = model_op
        reports = document.get("reports", [])
        if not isinstance(reports, list):
            raise CodecError("reports is not a list")
        return GroupModel(
            platform=_text(document, "platform"),
            engine=_text(document, "engine"),
            backend=_text(document, "backend"),
            dtype=_text(document, "dtype"),
            generation=_integer(document, "generation"),
            classes=classes,
            signatures=signatures,
            reports=reports,
            extents=_extents(document.get("measured_extents", {})),
        )
    except KeyError as exc:
        raise CodecError(f"a field is missing: {exc}") from exc
    except (TypeError, AttributeError) as exc:
        raise CodecError(f"a field has the wrong type ({type(exc).__name__})") from exc

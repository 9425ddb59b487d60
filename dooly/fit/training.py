"""What a fit learns from: a snapshot's training rows, split into groups of arrays, and the design
matrices of one operation class.

A group is one (platform, engine, backend, dtype): models never mix measurements of two of them.
Inside a group every signature gets a `SignatureInfo` (its config dims, request variables and the
static part of its physical features), every row a request-term vector and measured seconds.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from dooly import SCHEMA_VERSION
from dooly.errors import DoolyError
from dooly.fit.features import (
    StaticFeatures,
    check_request_vars,
    config_vector,
    family_of,
    log_design,
    physical_design,
    regime_of,
    request_from_rows,
    sm_count,
    static_features,
    term_matrix,
    var_mask_of,
    work_units,
)

if TYPE_CHECKING:
    import polars as pl

GROUP_COLUMNS = ("platform", "engine", "backend", "dtype")
STATUS_OK = "ok"


@dataclass
class SignatureInfo:
    """One profiled signature: what it is, its config dims and the static part of its features."""

    signature: str
    op: str
    op_class: str
    family: str
    config_dims: dict[str, int]
    request_vars: tuple[str, ...]
    static: StaticFeatures
    units: dict[str, int] = field(default_factory=dict)  # elements per unit of each request var

    def model_fields(self) -> dict[str, Any]:
        """The identity every op model built for this signature carries (own, class-bound or
        heads-affine alike), so the three builders cannot drift apart."""
        return dict(
            signature=self.signature,
            op=self.op,
            op_class=self.op_class,
            family=self.family,
            request_vars=self.request_vars,
            window=self.static.window,
            wave_tiles=self.static.wave_tiles,
        )


@dataclass
class GroupData:
    """One group's training rows as arrays: which signature, request terms, measured seconds."""

    key: tuple[str, str, str, str]
    infos: list[SignatureInfo]
    row_sig: np.ndarray
    terms: np.ndarray
    seconds: np.ndarray
    point_keys: list[str] = field(default_factory=list)

    @property
    def row_class(self) -> np.ndarray:
        classes = np.array([info.op_class for info in self.infos], dtype=object)
        return classes[self.row_sig]


def training_rows(frame: pl.DataFrame) -> pl.DataFrame:
    """The rows a fit learns from: status ok, a positive median, one row per point (newest wins)."""
    import polars as pl

    if frame.height == 0:
        raise DoolyError("the snapshot holds no rows: profile something, then `dooly merge`")
    if "schema_version" in frame.columns:
        versions = sorted(set(frame.get_column("schema_version").unique().to_list()))
        if versions != [SCHEMA_VERSION]:
            raise DoolyError(
                f"the snapshot holds rows of schema version(s) {versions}; this Dooly reads "
                f"version {SCHEMA_VERSION}"
            )
    ok = frame.filter(
        (pl.col("status") == STATUS_OK)
        & pl.col("latency_median_s").is_not_null()
        & (pl.col("latency_median_s") > 0)
    )
    if ok.height == 0:
        raise DoolyError(f"the snapshot holds {frame.height} rows but none with status 'ok' to fit on")
    if "created_at" in ok.columns:
        ok = ok.sort("created_at")
    return ok.unique(subset=[*GROUP_COLUMNS, "signature", "point_key"], keep="last", maintain_order=True)


def _signature_info(
    signature: str, op: str, op_class: str, config_json: str, vars_json: str, signature_json: str = "",
    *, sms: int = 0,
) -> SignatureInfo:
    config = {str(k): int(v) for k, v in json.loads(config_json or "{}").items() if v is not None}
    request_vars = tuple(json.loads(vars_json or "[]"))
    check_request_vars(request_vars, f"signature {signature}")
    family = family_of(op_class, op)
    return SignatureInfo(
        signature=signature,
        op=op,
        op_class=op_class,
        family=family,
        config_dims=config,
        request_vars=request_vars,
        static=static_features(family, op, config, request_vars, sms),
        units=work_units(signature_json, request_vars),
    )


def group_data(frame: pl.DataFrame) -> list[GroupData]:
    """Split training rows into groups and turn each into arrays."""
    out: list[GroupData] = []
    for key, part in frame.group_by(list(GROUP_COLUMNS), maintain_order=True):
        sigs = part.unique("signature", keep="first", maintain_order=True)
        columns = ["signature", "op", "op_class", "config_dims", "request_vars"]
        if "signature_json" in sigs.columns:
            columns.append("signature_json")
        sms = sm_count(str(key[GROUP_COLUMNS.index("platform")]))
        infos = [_signature_info(*row, sms=sms) for row in sigs.select(columns).iter_rows()]
        position = {info.signature: i for i, info in enumerate(infos)}
        row_sig = np.array([position[s] for s in part.get_column("signature").to_list()], dtype=np.int64)
        windows = np.array([infos[i].static.window for i in row_sig], dtype=np.int64)
        wave_tiles = np.array([infos[i].static.wave_tiles for i in row_sig], dtype=np.float64)
        arrays = {v: part.get_column(v).to_numpy() for v in ("T", "B", "K", "D")}
        request = request_from_rows(arrays, part.get_column("point_key").to_list(), windows, wave_tiles)
        platform_name, engine, backend, dtype = (str(k) for k in key)
        out.append(
            GroupData(
                key=(platform_name, engine, backend, dtype),
                infos=infos,
                row_sig=row_sig,
                terms=term_matrix(request, part.height),
                seconds=part.get_column("latency_median_s").to_numpy().astype(np.float64),
                point_keys=part.get_column("point_key").to_list(),
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# Class designs


@dataclass
class ClassDesign:
    """Rows of one operation class with their physical and log features."""

    op_class: str
    family: str
    config_names: tuple[str, ...]
    request_vars: tuple[str, ...]
    rows: np.ndarray  # indices into the group's rows
    sig_ids: np.ndarray  # group signature index per row
    physical: np.ndarray
    logx: np.ndarray
    seconds: np.ndarray
    regimes: np.ndarray


def class_design(data: GroupData, op_class: str, rows: np.ndarray) -> ClassDesign:
    """The design of one class's rows: its cross-signature regressors are fitted and scored on it."""
    sig_ids = data.row_sig[rows]
    members = sorted(set(sig_ids.tolist()))
    infos = {i: data.infos[i] for i in members}
    names = tuple(sorted({name for info in infos.values() for name in info.config_dims}))
    vars_count = Counter(infos[i].request_vars for i in sig_ids.tolist())
    local = {i: k for k, i in enumerate(members)}
    member_idx = np.array([local[i] for i in sig_ids.tolist()], dtype=np.int64)
    term_index = np.stack([infos[i].static.term_index for i in members])[member_idx]
    multiplier = np.stack([infos[i].static.multiplier for i in members])[member_idx]
    config = np.stack([config_vector(infos[i].config_dims, names) for i in members])[member_idx]
    masks = np.stack([var_mask_of(infos[i].request_vars) for i in members])[member_idx]
    terms = data.terms[rows]
    physical = physical_design(terms, term_index, multiplier)
    return ClassDesign(
        op_class=op_class,
        family=infos[members[0]].family,
        config_names=names,
        request_vars=vars_count.most_common(1)[0][0],
        rows=rows,
        sig_ids=sig_ids,
        physical=physical,
        logx=log_design(terms, physical, config, masks),
        seconds=data.seconds[rows],
        regimes=regime_of(terms),
    )



"""The fitted artifact of one group (platform, engine, backend, dtype): what a Predictor reads.

It lives apart from fitting (selection.py), persistence (persist.py, codec.py) and prediction
(predictor.py) so that each of them can import it without importing the others.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from dooly.fit.extent import MeasuredExtent
from dooly.fit.features import (
    ATTENTION_FIELD_SOURCES,
    FAMILY_ATTENTION,
    HEAD_DIM,
    NUM_HEADS,
    NUM_KV_HEADS,
    TERM_INDEX,
    TERMS,
    aggregates_from_seqs,
    attention_field,
    config_vector,
    term_matrix,
    var_mask_of,
)
from dooly.fit.regressors import (
    METHOD_HEADS_AFFINE,
    METHOD_HEADS_PROPORTIONAL,
    METHOD_HEADS_SHARED,
    METHOD_LAYOUT_SCALED,
    BoundClassModel,
    ClassModel,
    CorrectedLinearModel,
    HeadsAffineModel,
    LinearModel,
    OpModel,
)
from dooly.fit.training import SignatureInfo

# Query-head peers a layout needs (an affine law through one point is no law).
MIN_HEAD_PEERS = 2
# How far outside its peers' query heads a layout is still served by them: at most this factor
# below the fewest or above the most (farther, the class regressor answers).
MAX_HEADS_EXTRAPOLATION = 2.0
# Attention implementations (the backend's part after "|") where a layout with a single query-head
# peer takes that peer's model times heads / peer heads (METHOD_HEADS_PROPORTIONAL). Eager attention
# repeats the KV heads to the query heads and materialises a [heads, T, K] score tensor, so nearly
# all of its time scales with the query heads; held out, peer by peer, on both stores (12 pairs
# within MAX_HEADS_EXTRAPOLATION) its time-weighted error is 1.5-4.1% against the class regressor's
# 5.3-24.4% (bench/attention_layouts.py, docs/unseen.md "One query-head peer").
HEADS_PROPORTIONAL_IMPLEMENTATIONS = ("eager",)
# Attention implementations where a layout with a single query-head peer takes METHOD_HEADS_SHARED:
# sdpa's kernels read the KV once for a group of query heads, so only part of the peer's work scales
# with the heads. Held out on both stores (12 pairs within MAX_HEADS_EXTRAPOLATION) its mean
# time-weighted error is 7.6% against the class regressor's 11.6%, with half its |bias|; it loses
# three H100 pairs (32 <- 64, 40 <- 64, 40 <- 24; docs/unseen.md "One query-head peer").
HEADS_SHARED_IMPLEMENTATIONS = ("sdpa",)
# Request terms of one layout's own linear work that the query heads do not scale: per call, per
# sequence, per decode, the KV read and its alignment (the rest: query tokens, score and padded
# pairs, waves, pair alignment).
HEADS_SHARED_TERMS = ("const", "B", "D", "K", "S", "odd_kv", "unaligned_kv")
# Attention implementations where a full-attention layout with no query-head peer (other KV heads,
# another head dim) takes METHOD_LAYOUT_SCALED from the nearest measured layout with the same other
# dims, each layout field within MAX_HEADS_EXTRAPOLATION of it. Eager attention materialises a
# [heads, T, K] score tensor whatever the head dim and repeats the KV to the query heads, so its
# parts scale as `layout_term_factors` says; held out it beats the class regressor on all 4 such
# layouts of both stores (Llama-3.2-1B's 32/8/64 2.8% and 3.1% time-weighted against 17.3% and
# 40.1%, gemma-2-9b's 16/8/256 6.1% against 34.9%). Sliding-window layouts keep the class
# regressor: of the two held out the rule won one and lost one (13.9% against 13.3% on average).
# sdpa's kernels change tiles with the head dim (per FLOP 1.22x at 64 and 1.85x at 256 against 128
# on the H100), which no ratio of the layout carries: there it lost 4 of 6 layouts to the class
# regressor (docs/unseen.md "A head dim never profiled").
LAYOUT_SCALED_IMPLEMENTATIONS = ("eager",)
# Per part of a layout's own linear work, what scales it: nothing (per call, per sequence, per
# decode: LAYOUT_FIXED_TERMS), the query rows (LAYOUT_QUERY_TERMS) and the KV read with its
# alignment (LAYOUT_KV_TERMS) by their widths, and the rest (pairs of query and key tokens, their
# padding and alignment, waves) as the implementation's score work: eager materialises a [heads, T,
# K] score tensor whatever the head dim and repeats the KV to the query heads; sdpa's kernels do
# heads x head dim FLOPs per pair and read the KV once per KV head (`layout_term_factors`).
LAYOUT_FIXED_TERMS = ("const", "B", "D")
LAYOUT_QUERY_TERMS = ("T",)
LAYOUT_KV_TERMS = ("K", "S", "odd_kv", "unaligned_kv")
# (query heads, KV heads, head dim).
Layout = tuple[int, int, int]
# Config dims that hold the query heads, by name and by position (`other_dims`).
HEADS_FIELDS = frozenset(ATTENTION_FIELD_SOURCES[NUM_HEADS])
# Config dims that make the layout: query heads, KV heads and head dim by name, and by position in
# the query [1, heads, T, dim], key and value [1, kv_heads, K, dim] tensors.
LAYOUT_FIELDS = frozenset(
    {NUM_HEADS, NUM_KV_HEADS, HEAD_DIM} | {f"in{tensor}.{axis}" for tensor in (0, 1, 2) for axis in (1, 3)}
)


@dataclass
class GroupModel:
    """Everything a Predictor needs for one platform/engine/backend/dtype."""

    platform: str
    engine: str
    backend: str
    dtype: str
    generation: int
    classes: dict[str, ClassModel]
    signatures: dict[str, OpModel]
    reports: list[dict[str, Any]] = field(default_factory=list)
    # How far each measured signature was measured (dooly.fit.extent), by signature; empty in
    # groups fitted before it was recorded, whose extrapolation coverage cannot tell.
    extents: dict[str, MeasuredExtent] = field(default_factory=dict)


def bind_class_model(
    cm: ClassModel, info: SignatureInfo, factor: float = 1.0, method: str = ""
) -> BoundClassModel:
    """A class model applied to one signature: how an unprofiled signature (or a profiled one too
    poor for a model of its own, with the median measured/predicted `factor`) is predicted."""
    return BoundClassModel(
        **info.model_fields(),
        method=method or cm.regressor.method,
        model=cm,
        static=info.static,
        config=config_vector(info.config_dims, cm.config_names),
        var_mask=var_mask_of(info.request_vars),
        factor=factor,
    )


def with_shared_ops(group: GroupModel, shared: GroupModel) -> GroupModel:
    """A backend's models plus the backend-independent ones: the profiler stores every op but
    attention once per platform, under the backend "any" (profile/provenance.py)."""
    return GroupModel(
        platform=group.platform,
        engine=group.engine,
        backend=group.backend,
        dtype=group.dtype,
        generation=group.generation,
        classes={**shared.classes, **group.classes},
        signatures={**shared.signatures, **group.signatures},
        reports=shared.reports + group.reports,
        extents={**shared.extents, **group.extents},
    )


def other_dims(config: Mapping[str, int], fields: Collection[str] = HEADS_FIELDS) -> dict[str, int]:
    """An attention op's config dims but FIELDS (by default its query heads, by name or by position;
    LAYOUT_FIELDS: its whole head layout)."""
    return {name: value for name, value in config.items() if name not in fields}


def shared_coef(coef: np.ndarray) -> np.ndarray:
    """A layout's linear coefficients over TERMS restricted to HEADS_SHARED_TERMS."""
    out = np.zeros_like(coef)
    idx = [TERM_INDEX[name] for name in HEADS_SHARED_TERMS]
    out[idx] = coef[idx]
    return out


def heads_shared_share(terms: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """Per batch (rows of request terms at the peer's own geometry), the share s of the peer's own
    linear work `terms @ coef` in the terms the query heads do not scale (0 where it has none)."""
    work = terms @ coef
    positive = work > 0
    return np.where(positive, (terms @ shared_coef(coef)) / np.where(positive, work, 1.0), 0.0)


def heads_shared_seconds(t_peer: np.ndarray, share: np.ndarray, ratio: float) -> np.ndarray:
    """METHOD_HEADS_SHARED: the peer's time with the heads-scaled part times ratio = heads / peer
    heads, t = t_peer (s + (1 - s) ratio)."""
    return t_peer * (share + (1.0 - share) * ratio)


def peer_linear_coef(model: OpModel) -> np.ndarray | None:
    """The coefficients of a peer's own linear work (a corrected model's, before its trees), or None."""
    corrected = model.corrected_terms()
    return corrected[0] if corrected is not None else model.linear_terms()


def splittable(model: OpModel) -> tuple[LinearModel | CorrectedLinearModel, np.ndarray] | None:
    """A model whose work can be split by restricting its `coef` (a linear model, or one times its
    tree correction) with its `peer_linear_coef`, else None."""
    if not isinstance(model, (LinearModel, CorrectedLinearModel)):
        return None
    coef = peer_linear_coef(model)
    return None if coef is None else (model, coef)


def heads_shared_members(model: OpModel, ratio: float, weight: float = 1.0) -> list[tuple[float, OpModel]] | None:
    """`heads_shared_seconds` of one peer as weighted members, linear in them (the step predictor's
    fast paths serve them): with work = terms . coef (times the peer's correction, if any) and its
    shared part, t_peer (s + (1 - s) ratio) = ratio t_peer + (1 - ratio) (shared work, corrected
    alike), the peer weighted `ratio` and the peer restricted to its shared terms `1 - ratio` (each
    times `weight`). Equal to it where the shared work is at least MIN_SECONDS (a launch term; 0
    shared terms: the peer alone). None: a peer model without linear terms to split."""
    split = splittable(model)
    if split is None:
        return None
    linear, coef = split
    members: list[tuple[float, OpModel]] = [(weight * ratio, model)]
    shared = shared_coef(coef)
    if np.any(shared != 0.0):
        members.append((weight * (1.0 - ratio), replace(linear, coef=shared)))
    return members


def heads_affine_model(
    cm: ClassModel, info: SignatureInfo, signatures: Mapping[str, OpModel]
) -> HeadsAffineModel | None:
    """An unprofiled attention layout served by measured layouts that differ from it in query heads
    only (see HeadsAffineModel), or None: not attention, fewer than MIN_HEAD_PEERS such layouts
    with models of their own (but see below), heads beyond MAX_HEADS_EXTRAPOLATION of theirs, or a
    combination that is not positive on every measured batch of the class (a wild extrapolation).

    With one head count among the peers, on an attention implementation of
    HEADS_PROPORTIONAL_IMPLEMENTATIONS: the peers' models times heads / peer heads
    (METHOD_HEADS_PROPORTIONAL; several peers of that head count share the weight); of
    HEADS_SHARED_IMPLEMENTATIONS: `heads_shared_members` of each (METHOD_HEADS_SHARED; None when a
    peer's model has no linear terms to split)."""
    heads = attention_field(info.config_dims, NUM_HEADS)
    if cm.family != FAMILY_ATTENTION or not heads or not cm.layouts:
        return None
    rest = other_dims(info.config_dims)
    peers: list[tuple[int, OpModel]] = []
    for signature, config in sorted(cm.layouts.items()):
        model = signatures.get(signature)
        peer_heads = attention_field(config, NUM_HEADS)
        if model is None or isinstance(model, BoundClassModel) or not peer_heads or peer_heads == heads:
            continue
        if other_dims(config) == rest:
            peers.append((peer_heads, model))
    distinct = sorted({h for h, _ in peers})
    if not distinct:
        return None
    if heads * MAX_HEADS_EXTRAPOLATION < distinct[0] or heads > distinct[-1] * MAX_HEADS_EXTRAPOLATION:
        return None
    if len(distinct) < MIN_HEAD_PEERS:
        implementation = cm.op_class.rsplit("|", 1)[-1]
        if implementation in HEADS_SHARED_IMPLEMENTATIONS:
            shared_members: list[tuple[float, OpModel]] = []
            for h, m in peers:
                split = heads_shared_members(m, heads / h, 1.0 / len(peers))
                if split is None:
                    return None
                shared_members += split
            return HeadsAffineModel(
                **info.model_fields(), method=METHOD_HEADS_SHARED, members=tuple(shared_members)
            )
        if implementation not in HEADS_PROPORTIONAL_IMPLEMENTATIONS:
            return None
        return HeadsAffineModel(
            **info.model_fields(),
            method=METHOD_HEADS_PROPORTIONAL,
            members=tuple((heads / (h * len(peers)), m) for h, m in peers),
        )
    design = np.array([[1.0, float(h)] for h, _ in peers])
    weights = np.array([1.0, float(heads)]) @ np.linalg.pinv(design)
    model = HeadsAffineModel(
        **info.model_fields(),
        method=METHOD_HEADS_AFFINE,
        members=tuple((float(w), m) for w, (_, m) in zip(weights, peers, strict=True)),
    )
    if cm.reference_seqs:
        batches = aggregates_from_seqs(cm.reference_seqs, model.window, model.wave_tiles)
        if not np.all(model.predict_terms(term_matrix(batches, len(cm.reference_seqs))) > 0):
            return None
    return model


def layout_of(config: Mapping[str, int]) -> Layout | None:
    """(query heads, KV heads, head dim) of an attention op, or None where any is missing."""
    heads = attention_field(config, NUM_HEADS)
    head_dim = attention_field(config, HEAD_DIM)
    if not heads or not head_dim:
        return None
    return heads, attention_field(config, NUM_KV_HEADS) or heads, head_dim


def layout_distance(a: Layout, b: Layout) -> float:
    """How far two layouts are: the sum over their fields of |log ratio|."""
    return float(sum(abs(np.log(x / y)) for x, y in zip(a, b, strict=True)))


def layout_term_factors(layout: Layout, peer: Layout, implementation: str) -> np.ndarray:
    """Per request term (TERMS), the factor that takes a peer layout's work in it to the layout's."""
    heads, kv_heads, head_dim = layout
    peer_heads, peer_kv_heads, peer_dim = peer
    width = heads * head_dim / (peer_heads * peer_dim)
    # Implementations that materialise per-head scores (and repeat the KV to the query heads).
    scores = implementation in HEADS_PROPORTIONAL_IMPLEMENTATIONS
    factors = np.full(len(TERMS), heads / peer_heads if scores else width)
    factors[[TERM_INDEX[name] for name in LAYOUT_FIXED_TERMS]] = 1.0
    factors[[TERM_INDEX[name] for name in LAYOUT_QUERY_TERMS]] = width
    kv_width = width if scores else kv_heads * head_dim / (peer_kv_heads * peer_dim)
    factors[[TERM_INDEX[name] for name in LAYOUT_KV_TERMS]] = kv_width
    return factors


def layout_scaled_members(
    model: OpModel, factors: np.ndarray, weight: float = 1.0
) -> list[tuple[float, OpModel]] | None:
    """A peer's model as weighted members, one per distinct factor: the model restricted to the
    terms of that factor (times the peer's correction, if any), weighted factor x `weight`. None: a
    peer model without linear terms to split."""
    split = splittable(model)
    if split is None:
        return None
    linear, coef = split
    members: list[tuple[float, OpModel]] = []
    for factor in np.unique(factors):
        part = np.where(factors == factor, coef, 0.0)
        if np.any(part != 0.0):
            members.append((weight * float(factor), replace(linear, coef=part)))
    return members or None


def layout_scaled_model(
    cm: ClassModel,
    info: SignatureInfo,
    signatures: Mapping[str, OpModel],
    implementations: tuple[str, ...] = LAYOUT_SCALED_IMPLEMENTATIONS,
    windowed: bool = False,
) -> HeadsAffineModel | None:
    """An unprofiled attention layout served by the nearest measured layout (layout_distance) with
    the same window and every other config dim, each of its fields within MAX_HEADS_EXTRAPOLATION:
    that layout's own work, each part scaled as `layout_term_factors` says (several at the same
    distance share the weight). None: not one of `implementations`, a sliding-window layout unless
    `windowed` (bench/attention_layouts.py studies both), no such layout, or one whose model has no
    linear terms to split."""
    implementation = cm.op_class.rsplit("|", 1)[-1]
    layout = layout_of(info.config_dims)
    if cm.family != FAMILY_ATTENTION or implementation not in implementations or layout is None:
        return None
    if info.static.window and not windowed:
        return None
    rest = other_dims(info.config_dims, LAYOUT_FIELDS)
    peers: list[tuple[float, Layout, OpModel]] = []
    for signature, config in sorted(cm.layouts.items()):
        model = signatures.get(signature)
        peer = layout_of(config)
        if model is None or isinstance(model, BoundClassModel) or peer is None or peer == layout:
            continue
        if other_dims(config, LAYOUT_FIELDS) != rest:
            continue
        if any(max(a, b) > MAX_HEADS_EXTRAPOLATION * min(a, b) for a, b in zip(layout, peer, strict=True)):
            continue
        peers.append((layout_distance(layout, peer), peer, model))
    if not peers:
        return None
    nearest = min(distance for distance, _, _ in peers)
    chosen = [(peer, model) for distance, peer, model in peers if np.isclose(distance, nearest)]
    members: list[tuple[float, OpModel]] = []
    for peer, model in chosen:
        split = layout_scaled_members(model, layout_term_factors(layout, peer, implementation), 1.0 / len(chosen))
        if split is None:
            return None
        members += split
    return HeadsAffineModel(**info.model_fields(), method=METHOD_LAYOUT_SCALED, members=tuple(members))

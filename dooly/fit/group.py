"""The fitted artifact of one group (platform, engine, backend, dtype): what a Predictor reads.

It lives apart from fitting (selection.py), persistence (persist.py, codec.py) and prediction
(predictor.py) so that each of them can import it without importing the others.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dooly.fit.features import (
    ATTENTION_FIELD_SOURCES,
    FAMILY_ATTENTION,
    NUM_HEADS,
    aggregates_from_seqs,
    attention_field,
    config_vector,
    term_matrix,
    var_mask_of,
)
from dooly.fit.regressors import (
    METHOD_HEADS_AFFINE,
    METHOD_HEADS_PROPORTIONAL,
    BoundClassModel,
    ClassModel,
    HeadsAffineModel,
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
# 5.3-24.4% (bench/attention_layouts.py, docs/unseen.md "One query-head peer"). sdpa's kernels read
# the KV once for a group of query heads: there the scaling is partial and no one-peer rule beat
# the class regressor on every pair, so it keeps the regressor.
HEADS_PROPORTIONAL_IMPLEMENTATIONS = ("eager",)


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
    )


def other_dims(config: Mapping[str, int]) -> dict[str, int]:
    """An attention op's config dims but its query heads (by name or by position)."""
    heads_fields = set(ATTENTION_FIELD_SOURCES[NUM_HEADS])
    return {name: value for name, value in config.items() if name not in heads_fields}


def heads_affine_model(
    cm: ClassModel, info: SignatureInfo, signatures: Mapping[str, OpModel]
) -> HeadsAffineModel | None:
    """An unprofiled attention layout served by measured layouts that differ from it in query heads
    only (see HeadsAffineModel), or None: not attention, fewer than MIN_HEAD_PEERS such layouts
    with models of their own (but see below), heads beyond MAX_HEADS_EXTRAPOLATION of theirs, or a
    combination that is not positive on every measured batch of the class (a wild extrapolation).

    With one head count among the peers, on an attention implementation of
    HEADS_PROPORTIONAL_IMPLEMENTATIONS: the peers' models times heads / peer heads
    (METHOD_HEADS_PROPORTIONAL; several peers of that head count share the weight)."""
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
        if cm.op_class.rsplit("|", 1)[-1] not in HEADS_PROPORTIONAL_IMPLEMENTATIONS:
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

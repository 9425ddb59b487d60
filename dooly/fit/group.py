"""The fitted artifact of one group (platform, engine, backend, dtype): what a Predictor reads.

It lives apart from fitting (selection.py), persistence (persist.py, codec.py) and prediction
(predictor.py) so that each of them can import it without importing the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dooly.fit.features import config_vector, var_mask_of
from dooly.fit.regressors import BoundClassModel, ClassModel, OpModel
from dooly.fit.training import SignatureInfo


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
        signature=info.signature,
        op=info.op,
        op_class=info.op_class,
        family=info.family,
        request_vars=info.request_vars,
        window=info.static.window,
        wave_tiles=info.static.wave_tiles,
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

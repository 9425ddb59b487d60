"""Collectives as an operation class: ring-model features, and an unseen hidden size predicted
from the measured ones."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from dooly.fit.features import FAMILY_COLLECTIVE, TERM_INDEX, family_of, static_features
from dooly.fit.predictor import Predictor
from dooly.fit.selection import fit_frame

GROUP = ("NVIDIA-H200", "nccl", "NV18", "bfloat16")
HOP_S = 6e-6
LAUNCH_S = 4e-6
BYTES_PER_S = 300e9
ELEMENT_BYTES = 2
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def ring_seconds(tokens: np.ndarray, hidden: int, ranks: int) -> np.ndarray:
    bus = 2.0 * (ranks - 1) / ranks * tokens * hidden * ELEMENT_BYTES
    return LAUNCH_S + 2 * (ranks - 1) * HOP_S + bus / BYTES_PER_S


def config(hidden: int, ranks: int) -> dict[str, int]:
    return {"in0.0": 1, "in0.2": hidden, "world_size": ranks}


def frame(signatures: list[tuple[int, int]]) -> pl.DataFrame:
    rows = []
    for hidden, ranks in signatures:
        seconds = ring_seconds(np.array(TOKENS, dtype=float), hidden, ranks)
        for tokens, value in zip(TOKENS, seconds):
            rows.append({
                **dict(zip(("platform", "engine", "backend", "dtype"), GROUP)),
                "signature": f"ar-{hidden}-{ranks}", "op": "collective.all_reduce", "op_class": "collective.all_reduce",
                "config_dims": json.dumps(config(hidden, ranks)), "request_vars": json.dumps(["T"]),
                "T": tokens, "B": 0, "K": 0, "D": 0, "point_key": json.dumps({"T": tokens}),
                "latency_median_s": float(value), "status": "ok",
            })
    return pl.DataFrame(rows)


def test_collective_features_follow_the_ring():
    assert family_of("collective.all_reduce") == FAMILY_COLLECTIVE
    static = static_features(FAMILY_COLLECTIVE, "collective.all_reduce", config(4096, 4), ["T"])
    assert static.multiplier.tolist() == [1.0, 3.0, 1.5 * 4096, 4096.0]
    assert static.term_index.tolist() == [TERM_INDEX["const"], TERM_INDEX["const"], TERM_INDEX["T"], TERM_INDEX["T"]]
    gather = static_features(FAMILY_COLLECTIVE, "collective.all_gather", config(128, 2), ["B"])
    assert gather.multiplier[2] == 128.0 and gather.term_index[2] == TERM_INDEX["B"]


def test_an_unseen_hidden_size_is_predicted_from_the_class():
    measured = [(1024, 2), (4096, 2), (8192, 2), (2048, 4), (8192, 4)]
    models, report = fit_frame(frame(measured), generation=1, folds=3)
    predictor = Predictor(models[GROUP])
    (entry,) = report.groups[0]["classes"]
    assert entry["op_class"] == "collective.all_reduce" and entry["signatures"] == len(measured)
    tokens = np.array([1, 100, 3000], dtype=float)
    for hidden, ranks in ((5120, 2), (4096, 4)):
        predicted = predictor.predict_ops(["unseen"] * 3, ["collective.all_reduce"] * 3, [config(hidden, ranks)] * 3,
                                          {"T": tokens}, request_vars=[["T"]] * 3, ops=["collective.all_reduce"] * 3)
        assert predicted == pytest.approx(ring_seconds(tokens, hidden, ranks), rel=0.05)

"""An attention layout never profiled that differs from measured ones in query heads only is served
by their own models, combined affinely in the heads (dooly.fit.group.heads_affine_model); with a
single such peer, on eager attention, by that peer's model times the ratio of the heads
(heads-proportional), on sdpa by the peer's model with only its heads-scaled work times that ratio
(heads-shared); an eager layout with no query-head peer (other KV heads, another head dim) by the
nearest measured layout's work scaled part by part (layout-scaled); every other unseen layout keeps
the class regressor. The step predictor's fast paths give what the model
gives, each member at its own wave size, and a store fitted before the layouts were stored reads
as before."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from dooly.fit import codec
from dooly.fit import synthetic as syn
from dooly.fit.features import (
    ATTENTION_FEATURES,
    N_REGIMES,
    N_TERMS,
    TERM_INDEX,
    aggregates_from_seqs,
    sm_count,
    term_matrix,
)
from dooly.fit.group import GroupModel
from dooly.fit.predictor import SOURCE_CLASS, Predictor
from dooly.fit.regressors import (
    METHOD_HEADS_AFFINE,
    METHOD_HEADS_PROPORTIONAL,
    METHOD_HEADS_SHARED,
    METHOD_LAYOUT_SCALED,
    METHOD_NNLS,
    ClassModel,
    ClassRegressor,
    HeadsAffineModel,
    LinearModel,
    RegimeLinearModel,
)

PLATFORM = "NVIDIA-H100-80GB-HBM3"
BACKEND = "paged|sdpa"
OP_CLASS = f"attention:{BACKEND}"
EAGER = "paged|eager"
EAGER_CLASS = f"attention:{EAGER}"
REQUEST_VARS = ("T", "B", "K", "D", "S")
PEER_HEADS = (32, 40, 64)
# Per head and (query, key) pair, per wave-key, and per call: the peers' exact laws.
PAIR_S = 1e-12
WAVE_S = 2e-9
LAUNCH_S = 1e-5
CLASS_COEF_S = 1e-13
REFERENCE_SEQS = [[[16, 0]], [[1, 100]], [[512, 1024], [1, 4000]], [[2048, 0]]]
STEPS = [([(100, 50)], [300, 700]), ([(700, 0)], []), ([], [4000] * 16), ([(2080, 0)], []), ([(17, 3)], [1])]
COUNT = 28
# The synthetic attention law is affine in the query heads: the peers' own models carry it to a
# new head count within their own error.
SYNTHETIC_TOLERANCE = 0.03


def config(heads: int, kv_heads: int = 8, head_dim: int = 128) -> dict[str, int]:
    return {"in0.1": heads, "in0.3": head_dim, "in1.1": kv_heads, "in1.3": head_dim}


def peer(heads: int, op_class: str = OP_CLASS) -> LinearModel:
    """A measured layout whose time is linear in its heads, with a wave term at its own wave size."""
    coef = np.zeros(N_TERMS)
    coef[TERM_INDEX["const"]] = LAUNCH_S
    coef[TERM_INDEX["T*K"]] = PAIR_S * heads
    coef[TERM_INDEX["waves_kv"]] = WAVE_S
    return LinearModel(
        signature=f"peer{heads}", op="attention", op_class=op_class, family="attention",
        request_vars=REQUEST_VARS, window=0, method="local-nnls", wave_tiles=sm_count(PLATFORM) / heads, coef=coef,
    )


def group(
    peers: dict[str, tuple[LinearModel, dict[str, int]]], layouts: bool = True, backend: str = BACKEND
) -> GroupModel:
    regressor = ClassRegressor(METHOD_NNLS, coef=np.full(len(ATTENTION_FEATURES), CLASS_COEF_S))
    names = ("in0.1", "in0.3", "in1.1", "in1.3")
    op_class = f"attention:{backend}"
    class_model = ClassModel(
        op_class=op_class, family="attention", config_names=names, request_vars=REQUEST_VARS, regressor=regressor,
        reference_seqs=REFERENCE_SEQS, layouts={s: c for s, (_, c) in peers.items()} if layouts else {},
    )
    return GroupModel(
        platform=PLATFORM, engine="transformers", backend=backend, dtype="bfloat16", generation=1,
        classes={op_class: class_model}, signatures={s: m for s, (m, _) in peers.items()},
    )


def heads_group() -> GroupModel:
    return group({f"peer{h}": (peer(h), config(h)) for h in PEER_HEADS})


def seqs_of(prefill, decode_ctx) -> list[list[int]]:
    return [[q, c] for q, c in prefill] + [[1, c] for c in decode_ctx]


def test_a_layout_between_its_peers_is_their_affine_combination():
    predictor = Predictor(heads_group())
    model, source = predictor.op_source("new", OP_CLASS, config(24), REQUEST_VARS, "attention")
    assert source == SOURCE_CLASS and model.method == METHOD_HEADS_AFFINE
    assert isinstance(model, HeadsAffineModel)
    weights = [w for w, _ in model.members]
    assert sum(weights) == pytest.approx(1.0)
    for prefill, decode_ctx in STEPS:
        seqs = [seqs_of(prefill, decode_ctx)]
        own = term_matrix(aggregates_from_seqs(seqs, 0, model.wave_tiles), 1)
        # Each peer read at its own wave size: the law's pair term is exact in the heads, its wave
        # term is the peers' own waves, combined with the same weights.
        waves = sum(
            w * WAVE_S * term_matrix(aggregates_from_seqs(seqs, 0, m.wave_tiles), 1)[0, TERM_INDEX["waves_kv"]]
            for w, m in model.members
        )
        expected = LAUNCH_S + PAIR_S * 24 * own[0, TERM_INDEX["T*K"]] + waves
        assert model.predict_terms(own)[0] == pytest.approx(expected, rel=1e-12)


def step_inventory(op_class: str = OP_CLASS) -> dict:
    """An unseen model of one attention op of 24 query heads, COUNT times per step."""
    return {"model_id": "new", "operations": [
        {"signature": "new", "op_class": op_class, "op": "attention", "config_dims": config(24),
         "request_vars": list(REQUEST_VARS), "count": COUNT},
    ]}


def assert_steps_serve_it_as_per_op(predictor: Predictor, op_class: str, method: str, exact: bool = False) -> None:
    """The step predictor (one step and many) gives COUNT times the per-op seconds on every step,
    and its coverage names METHOD for all of them."""
    steps = predictor.step_predictor(step_inventory(op_class), exact=exact)
    assert steps.sources == {"new": SOURCE_CLASS}
    many = steps.step_seconds_many(STEPS)
    for (prefill, decode_ctx), batched in zip(STEPS, many, strict=True):
        single = predictor.predict_ops(["new"], [op_class], [config(24)], {"seqs": [seqs_of(prefill, decode_ctx)]},
                                       request_vars=[REQUEST_VARS], ops=["attention"])
        assert steps.step_seconds(prefill, decode_ctx) == pytest.approx(COUNT * single[0], rel=1e-9)
        assert batched == pytest.approx(COUNT * single[0], rel=1e-9)
    coverage = steps.coverage_many(STEPS)
    assert [e.method for e in coverage.estimated] == [method]
    assert coverage.seconds == pytest.approx(float(many.sum()), rel=1e-9)


def test_the_step_predictor_serves_the_combination_exactly():
    assert_steps_serve_it_as_per_op(Predictor(heads_group()), OP_CLASS, METHOD_HEADS_AFFINE)


@pytest.mark.parametrize(
    "new_config, peers",
    [
        (config(24, kv_heads=4), PEER_HEADS),  # another KV head count: no peer
        (config(24, head_dim=64), PEER_HEADS),  # another head dim
        ({**config(24), "sliding_window": 4096}, PEER_HEADS),  # another window
        (config(8), PEER_HEADS),  # far below the fewest heads measured
        (config(256), PEER_HEADS),  # far above the most
    ],
)
def test_other_layouts_keep_the_class_regressor(new_config, peers):
    predictor = Predictor(group({f"peer{h}": (peer(h), config(h)) for h in peers}))
    model, source = predictor.op_source("new", OP_CLASS, new_config, REQUEST_VARS, "attention")
    assert source == SOURCE_CLASS and model.method == METHOD_NNLS


def test_a_store_fitted_before_the_layouts_uses_the_class_regressor():
    document = codec.encode_group(heads_group())
    for entry in document["classes"]:
        del entry["layouts"]
    old = codec.decode_group(json.loads(json.dumps(document)))
    assert old.classes[OP_CLASS].layouts == {}
    model, _ = Predictor(old).op_source("new", OP_CLASS, config(24), REQUEST_VARS, "attention")
    assert model.method == METHOD_NNLS


def test_layouts_round_trip_and_malformed_ones_are_refused():
    fitted = heads_group()
    loaded = codec.decode_group(json.loads(json.dumps(codec.encode_group(fitted))))
    assert loaded.classes[OP_CLASS].layouts == fitted.classes[OP_CLASS].layouts
    document = codec.encode_group(fitted)
    document["classes"][0]["layouts"] = {"peer32": {"in0.1": "32"}}
    with pytest.raises(codec.CodecError, match="layouts"):
        codec.decode_group(document)


def test_a_combination_not_positive_on_the_measured_batches_is_refused():
    """Peers whose times fall with the heads extrapolate below zero: the class regressor answers."""
    falling = {}
    for h in PEER_HEADS:
        model = peer(h)
        coef = model.coef.copy()
        coef[TERM_INDEX["T*K"]] = PAIR_S * (100 - h)
        coef[TERM_INDEX["const"]] = 0.0
        falling[f"peer{h}"] = (dataclasses.replace(model, coef=coef), config(h))
    model, _ = Predictor(group(falling)).op_source("new", OP_CLASS, config(120), REQUEST_VARS, "attention")
    assert model.method == METHOD_NNLS


def test_a_fitted_store_serves_an_unseen_head_count_from_its_peers(predictor):
    """Fit -> stored layouts -> predictor: the synthetic store's 24-head model (peers of 8, 16 and
    32 heads, same KV heads and head dim) is served by them, close to the law."""
    (op,) = [o for o in syn.inventory(syn.UNSEEN_MODEL)["operations"] if o["op"] == "attention"]
    model, source = predictor.op_source(op["signature"], op["op_class"], op["config_dims"], op["request_vars"], op["op"])
    assert source == SOURCE_CLASS and model.method == METHOD_HEADS_AFFINE
    seqs = [[[300, 0]], [[1, 900]] * 12, [[128, 512], [1, 300], [1, 2000]], [[2048, 0]]]
    got = predictor.predict_ops([op["signature"]] * len(seqs), [op["op_class"]] * len(seqs),
                                [op["config_dims"]] * len(seqs), {"seqs": seqs},
                                request_vars=[op["request_vars"]] * len(seqs), ops=[op["op"]] * len(seqs))
    truth = syn.true_seconds(op, {"seqs": seqs})
    assert np.all(np.abs(got / truth - 1) < SYNTHETIC_TOLERANCE), got / truth


def eager_group(peer_heads: tuple[int, ...] = (32,)) -> GroupModel:
    return group({f"peer{h}": (peer(h, EAGER_CLASS), config(h)) for h in peer_heads}, backend=EAGER)


def test_one_eager_peer_scales_its_own_model_by_the_heads():
    """Eager attention, one measured layout differing in query heads only: its own model, at its
    own wave size, times heads / peer heads."""
    predictor = Predictor(eager_group())
    model, source = predictor.op_source("new", EAGER_CLASS, config(24), REQUEST_VARS, "attention")
    assert source == SOURCE_CLASS and model.method == METHOD_HEADS_PROPORTIONAL
    assert isinstance(model, HeadsAffineModel)
    ((weight, member),) = model.members
    assert weight == pytest.approx(24 / 32) and member.signature == "peer32"
    for prefill, decode_ctx in STEPS:
        seqs = [seqs_of(prefill, decode_ctx)]
        at_peer = term_matrix(aggregates_from_seqs(seqs, 0, member.wave_tiles), 1)[0]
        expected = 24 / 32 * (LAUNCH_S + PAIR_S * 32 * at_peer[TERM_INDEX["T*K"]]
                              + WAVE_S * at_peer[TERM_INDEX["waves_kv"]])
        own = term_matrix(aggregates_from_seqs(seqs, 0, model.wave_tiles), 1)
        assert model.predict_terms(own)[0] == pytest.approx(expected, rel=1e-12)
        got = predictor.predict_ops(["new"], [EAGER_CLASS], [config(24)], {"seqs": seqs},
                                    request_vars=[REQUEST_VARS], ops=["attention"])
        assert got[0] == pytest.approx(expected, rel=1e-12)


def test_the_step_predictor_serves_the_one_peer_rule_exactly():
    assert_steps_serve_it_as_per_op(Predictor(eager_group()), EAGER_CLASS, METHOD_HEADS_PROPORTIONAL)


@pytest.mark.parametrize(
    "new_config",
    [
        config(8),  # 4x below the one peer
        config(32, head_dim=32),  # 4x below its head dim
        config(32, kv_heads=32),  # 4x above its KV heads
        {**config(24), "sliding_window": 4096},  # another window
        {**config(32, head_dim=64), "softcap": 50},  # another config dim
    ],
)
def test_an_eager_layout_without_a_near_peer_keeps_the_class_regressor(new_config):
    model, _ = Predictor(eager_group()).op_source("new", EAGER_CLASS, new_config, REQUEST_VARS, "attention")
    assert model.method == METHOD_NNLS


def test_two_eager_peers_still_combine_affinely():
    model, _ = Predictor(eager_group(PEER_HEADS)).op_source("new", EAGER_CLASS, config(24), REQUEST_VARS, "attention")
    assert model.method == METHOD_HEADS_AFFINE


def test_one_sdpa_peer_scales_only_its_per_head_work():
    """sdpa, one measured layout differing in query heads only: its own model at its own wave size,
    t_peer (s + (1 - s) r), s the share of its linear work the heads do not scale (here the launch),
    r = heads / peer heads."""
    predictor = Predictor(group({"peer32": (peer(32), config(32))}))
    model, source = predictor.op_source("new", OP_CLASS, config(24), REQUEST_VARS, "attention")
    assert source == SOURCE_CLASS and model.method == METHOD_HEADS_SHARED
    assert isinstance(model, HeadsAffineModel)
    ratio = 24 / 32
    for prefill, decode_ctx in STEPS:
        seqs = [seqs_of(prefill, decode_ctx)]
        at_peer = term_matrix(aggregates_from_seqs(seqs, 0, sm_count(PLATFORM) / 32), 1)[0]
        work = LAUNCH_S + PAIR_S * 32 * at_peer[TERM_INDEX["T*K"]] + WAVE_S * at_peer[TERM_INDEX["waves_kv"]]
        share = LAUNCH_S / work
        expected = work * (share + (1 - share) * ratio)
        own = term_matrix(aggregates_from_seqs(seqs, 0, model.wave_tiles), 1)
        assert model.predict_terms(own)[0] == pytest.approx(expected, rel=1e-12)
        got = predictor.predict_ops(["new"], [OP_CLASS], [config(24)], {"seqs": seqs},
                                    request_vars=[REQUEST_VARS], ops=["attention"])
        assert got[0] == pytest.approx(expected, rel=1e-12)
        # Neither the peer scaled whole nor the peer itself.
        assert not got[0] == pytest.approx(ratio * work, rel=1e-6)


@pytest.mark.parametrize("exact", [False, True])
def test_the_step_predictor_serves_heads_shared_exactly(exact):
    predictor = Predictor(group({"peer32": (peer(32), config(32))}))
    assert_steps_serve_it_as_per_op(predictor, OP_CLASS, METHOD_HEADS_SHARED, exact=exact)


def test_an_sdpa_peer_without_linear_terms_keeps_the_class_regressor():
    """A peer model whose work cannot be split (one linear law per regime): the class regressor."""
    linear = peer(32)
    regime = RegimeLinearModel(
        signature="peer32", op="attention", op_class=OP_CLASS, family="attention", request_vars=REQUEST_VARS,
        window=0, method="regime-nnls", wave_tiles=linear.wave_tiles, regime_coef=np.tile(linear.coef, (N_REGIMES, 1)),
    )
    model, source = Predictor(group({"peer32": (regime, config(32))})).op_source(
        "new", OP_CLASS, config(24), REQUEST_VARS, "attention")
    assert source == SOURCE_CLASS and model.method == METHOD_NNLS


def test_one_eager_peer_is_still_scaled_whole():
    """The same one peer on eager attention keeps heads-proportional (not heads-shared)."""
    model, _ = Predictor(eager_group()).op_source("new", EAGER_CLASS, config(24), REQUEST_VARS, "attention")
    assert model.method == METHOD_HEADS_PROPORTIONAL and len(model.members) == 1


def test_two_sdpa_peers_still_combine_affinely():
    peers = {f"peer{h}": (peer(h), config(h)) for h in (32, 40)}
    model, _ = Predictor(group(peers)).op_source("new", OP_CLASS, config(24), REQUEST_VARS, "attention")
    assert model.method == METHOD_HEADS_AFFINE


# A peer's KV-read coefficient (per KV token), for the layout-scaled tests.
KV_S = 3e-10


def kv_peer(heads: int, op_class: str = EAGER_CLASS) -> LinearModel:
    """peer() plus a KV-read term, so that each of the three kinds of work is present."""
    model = peer(heads, op_class)
    coef = model.coef.copy()
    coef[TERM_INDEX["K"]] = KV_S
    return dataclasses.replace(model, coef=coef)


def test_an_eager_layout_of_another_head_dim_scales_the_nearest_layouts_work_part_by_part():
    """Eager, 32/8/64 from 32/8/128 (no query-head peer): per call unscaled, score pairs by the
    query heads (unchanged), the KV read by heads x head dim (halved)."""
    new = config(32, head_dim=64)
    predictor = Predictor(group({"peer32": (kv_peer(32), config(32))}, backend=EAGER))
    model, source = predictor.op_source("new", EAGER_CLASS, new, REQUEST_VARS, "attention")
    assert source == SOURCE_CLASS and model.method == METHOD_LAYOUT_SCALED
    for prefill, decode_ctx in STEPS:
        seqs = [seqs_of(prefill, decode_ctx)]
        at_peer = term_matrix(aggregates_from_seqs(seqs, 0, sm_count(PLATFORM) / 32), 1)[0]
        expected = (LAUNCH_S + PAIR_S * 32 * at_peer[TERM_INDEX["T*K"]] + WAVE_S * at_peer[TERM_INDEX["waves_kv"]]
                    + 0.5 * KV_S * at_peer[TERM_INDEX["K"]])
        got = predictor.predict_ops(["new"], [EAGER_CLASS], [new], {"seqs": seqs},
                                    request_vars=[REQUEST_VARS], ops=["attention"])
        assert got[0] == pytest.approx(expected, rel=1e-12)


def test_layout_scaled_takes_the_nearest_layout_and_scales_the_heads_too():
    """16/8/256 with 32/8/128 and 24/8/128 measured: the nearer 24 (|log| 0.41 + 0.69 against
    0.69 + 0.69), its pairs times 16/24 and its KV read times 16 x 256 / (24 x 128)."""
    new = config(16, head_dim=256)
    peers = {f"peer{h}": (kv_peer(h), config(h)) for h in (24, 32)}
    predictor = Predictor(group(peers, backend=EAGER))
    model, _ = predictor.op_source("new", EAGER_CLASS, new, REQUEST_VARS, "attention")
    assert model.method == METHOD_LAYOUT_SCALED
    assert {member.signature for _, member in model.members} == {"peer24"}
    for prefill, decode_ctx in STEPS:
        seqs = [seqs_of(prefill, decode_ctx)]
        at_peer = term_matrix(aggregates_from_seqs(seqs, 0, sm_count(PLATFORM) / 24), 1)[0]
        expected = (LAUNCH_S + 16 / 24 * (PAIR_S * 24 * at_peer[TERM_INDEX["T*K"]] + WAVE_S * at_peer[TERM_INDEX["waves_kv"]])
                    + 16 * 256 / (24 * 128) * KV_S * at_peer[TERM_INDEX["K"]])
        got = predictor.predict_ops(["new"], [EAGER_CLASS], [new], {"seqs": seqs},
                                    request_vars=[REQUEST_VARS], ops=["attention"])
        assert got[0] == pytest.approx(expected, rel=1e-12)


def test_an_sdpa_layout_of_another_head_dim_keeps_the_class_regressor():
    """sdpa's kernels change tiles with the head dim: no layout ratio serves it (docs/unseen.md)."""
    predictor = Predictor(group({"peer32": (kv_peer(32, OP_CLASS), config(32))}))
    model, _ = predictor.op_source("new", OP_CLASS, config(32, head_dim=64), REQUEST_VARS, "attention")
    assert model.method == METHOD_NNLS


@pytest.mark.parametrize("exact", [False, True])
def test_the_step_predictor_serves_layout_scaled_exactly(exact):
    predictor = Predictor(group({"peer32": (kv_peer(32), config(24, kv_heads=4))}, backend=EAGER))
    assert_steps_serve_it_as_per_op(predictor, EAGER_CLASS, METHOD_LAYOUT_SCALED, exact=exact)


def test_a_sliding_window_layout_keeps_the_class_regressor():
    """A windowed eager layout of another head dim, though a windowed layout is measured: of the two
    held out the rule won one and lost one, so the class regressor answers (docs/unseen.md)."""
    windowed = {"sliding_window": 4096}
    predictor = Predictor(group({"peer32": (kv_peer(32), {**config(32), **windowed})}, backend=EAGER))
    model, _ = predictor.op_source("new", EAGER_CLASS, {**config(32, head_dim=64), **windowed}, REQUEST_VARS,
                                   "attention")
    assert model.method == METHOD_NNLS

"""Step models: the CPU overhead file format, the path protocol, the analytic sketch."""

from __future__ import annotations

import json

import pytest

from dooly.errors import DoolyError
from dooly.sim.step_model import (
    FULL_READS_KEYWORD,
    PATH_KEYWORD,
    AnalyticStepModel,
    CpuOverheadModel,
    ModelDims,
    OverheadTerms,
    StepKind,
    StepPath,
    device_seconds,
    step_keywords,
)


def test_cpu_overhead_json_round_trip_and_lookup(tmp_path):
    model = CpuOverheadModel(
        terms={
            "decode_graph": OverheadTerms(constant_s=0.001, per_sequence_s=1e-5),
            "mixed": OverheadTerms(constant_s=0.003, per_token_s=2e-6, per_kv_token_s=1e-8),
            "default": OverheadTerms(constant_s=0.005),
        },
        engine="transformers",
        platform="NVIDIA H100",
        source="bench 2026-05",
    )
    path = tmp_path / "overhead.json"
    model.save(path)
    assert json.loads(path.read_text())["schema"] == "dooly.cpu_overhead/1"
    loaded = CpuOverheadModel.load(path)
    assert loaded == model
    graph_decode = StepPath(StepKind.DECODE, cuda_graph=True)
    assert loaded.seconds(graph_decode, num_seqs=10, num_tokens=10, kv_tokens=5000) == pytest.approx(0.001 + 10 * 1e-5)
    # mixed_graph falls back to mixed; prefill falls back to default.
    mixed_graph = StepPath(StepKind.MIXED, cuda_graph=True)
    assert loaded.seconds(mixed_graph, 3, 100, 1000) == pytest.approx(0.003 + 100 * 2e-6 + 1000 * 1e-8)
    assert loaded.seconds(StepPath(StepKind.PREFILL), 1, 500, 500) == pytest.approx(0.005)
    assert CpuOverheadModel.zero().seconds(graph_decode, 1, 1, 1) == 0.0


@pytest.mark.parametrize(
    "data, message",
    [
        ({"schema": "dooly.cpu_overhead/9"}, "schema"),
        ({"terms": {"warp": {"constant_s": 1}}}, "not one of"),
        ({"terms": {"decode": {"constant": 1}}}, "keys"),
        ({"terms": {"decode": {"constant_s": -1}}}, ">= 0"),
        ({"terms": {"decode": {"constant_s": "fast"}}}, "numbers"),
    ],
)
def test_bad_cpu_overhead_files_are_user_errors(tmp_path, data, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DoolyError, match=message):
        CpuOverheadModel.load(path)


def test_optional_step_keywords_are_detected():
    class Plain:
        def step_seconds(self, prefill, decode_ctx):
            return 0.0

    class Flexible:
        def step_seconds(self, prefill, decode_ctx, **extra):
            return 0.0

    class Windowed:
        def step_seconds(self, prefill, decode_ctx, full_reads=False):
            return 0.0

    assert step_keywords(Plain()) == frozenset()
    assert step_keywords(Flexible()) == {PATH_KEYWORD}
    assert step_keywords(AnalyticStepModel()) == {PATH_KEYWORD}
    assert step_keywords(Windowed()) == {FULL_READS_KEYWORD}


def test_a_padded_read_reaches_every_layer_only_when_the_kv_is_padded():
    """transformers pads one read index for every layer group under CUDA graphs: a model that
    takes `full_reads` gets it for a padded KV read, and not for padded query tokens alone."""
    calls = []

    class Windowed:
        def step_seconds(self, prefill, decode_ctx, full_reads=False):
            calls.append((list(prefill), list(decode_ctx), full_reads))
            return 1.0

    model = Windowed()
    keywords = step_keywords(model)
    padded_kv = StepPath(StepKind.DECODE, cuda_graph=True, padded_tokens=4, padded_kv=1024)
    device_seconds(model, [], [100, 200], padded_kv, keywords)
    assert calls[-1][2] is True
    assert sum(calls[-1][1]) + len(calls[-1][1]) + sum(q + c for q, c in calls[-1][0]) == 1024
    device_seconds(model, [], [100, 200], StepPath(StepKind.DECODE, cuda_graph=True, padded_tokens=4), keywords)
    assert calls[-1][2] is False
    device_seconds(model, [], [100, 200], StepPath(StepKind.DECODE), keywords)
    assert calls[-1] == ([], [100, 200], False)


def test_analytic_model_grows_with_work():
    model = AnalyticStepModel()
    assert model.step_seconds([], []) == 0.0
    small_decode = model.step_seconds([], [100] * 8)
    long_context = model.step_seconds([], [20_000] * 8)
    big_prefill = model.step_seconds([(4096, 0)], [])
    assert 0 < small_decode < long_context
    assert small_decode < big_prefill
    assert model.step_seconds([(512, 4096)], []) > model.step_seconds([(512, 0)], [])
    graph = StepPath(StepKind.DECODE, cuda_graph=True, padded_tokens=8)
    assert model.step_seconds([], [100] * 8, path=graph) < small_decode


def test_model_dims_from_a_bundled_config():
    from importlib import resources

    text = resources.files("dooly.models").joinpath("configs", "mistralai__Mistral-7B-v0.3.json").read_text()
    dims = ModelDims.from_config(json.loads(text), name="mistralai/Mistral-7B-v0.3")
    assert (dims.hidden_size, dims.intermediate_size, dims.num_kv_heads, dims.head_dim) == (4096, 14336, 8, 128)
    assert dims.gated_mlp
    with pytest.raises(DoolyError, match="lacks"):
        ModelDims.from_config({"hidden_size": 8})


def test_cpu_overhead_fit_recovers_known_terms():
    import random

    rng = random.Random(0)
    truth = {
        "decode_graph": OverheadTerms(constant_s=0.0012, per_sequence_s=2e-5),
        "mixed": OverheadTerms(constant_s=0.003, per_sequence_s=1e-5, per_token_s=4e-7, per_kv_token_s=2e-9),
    }
    samples = []
    for _ in range(200):
        seqs = rng.randint(1, 128)
        samples.append(("decode_graph", seqs, seqs, seqs * rng.randint(10, 4000), truth["decode_graph"].seconds(seqs, seqs, 0)))
        tokens, kv = rng.randint(seqs, 8192), rng.randint(8192, 500_000)
        samples.append(("mixed", seqs, tokens, kv, truth["mixed"].seconds(seqs, tokens, kv)))
    model = CpuOverheadModel.fit(samples, engine="transformers")
    mixed = model.terms["mixed"]
    assert mixed.constant_s == pytest.approx(0.003, rel=1e-3)
    assert mixed.per_token_s == pytest.approx(4e-7, rel=1e-3)
    assert mixed.per_kv_token_s == pytest.approx(2e-9, rel=1e-3)
    path = StepPath(StepKind.DECODE, cuda_graph=True)
    assert model.seconds(path, 64, 64, 64 * 900) == pytest.approx(truth["decode_graph"].seconds(64, 64, 0), rel=1e-3)
    assert set(model.terms) == {"default", "decode_graph", "mixed"}
    assert all(v >= 0 for t in model.terms.values() for v in (t.constant_s, t.per_sequence_s, t.per_token_s, t.per_kv_token_s))
    with pytest.raises(DoolyError, match="at least"):
        CpuOverheadModel.fit(samples[:3])
    with pytest.raises(DoolyError, match="unknown path"):
        CpuOverheadModel.fit([("warp", 1, 1, 1, 0.1)] * 10)


def test_graph_paths_share_their_input_building_slopes_and_keep_their_constants():
    """The engine builds a replayed step's inputs with the same code whatever the step holds: a
    mixed path seen over a narrow KV range borrows the KV slope the decode steps pin down."""
    import random

    rng = random.Random(1)
    per_kv, per_seq = 2.5e-7, 3e-5
    constants = {"decode_graph": 0.002, "mixed_graph": 0.005}
    noise = 0.05  # host timings jitter by a few percent step to step

    def measured(key: str, seqs: int, kv: int) -> float:
        return (constants[key] + per_seq * seqs + per_kv * kv) * rng.uniform(1 - noise, 1 + noise)

    samples = []
    for _ in range(300):
        seqs, kv = rng.randint(1, 64), rng.randint(1_000, 120_000)
        samples.append(("decode_graph", seqs, seqs, kv, measured("decode_graph", seqs, kv)))
    for _ in range(20):  # few mixed steps, all reading about the same number of KV tokens
        seqs, tokens, kv = rng.randint(4, 16), rng.randint(200, 600), rng.randint(9_000, 10_000)
        samples.append(("mixed_graph", seqs, tokens, kv, measured("mixed_graph", seqs, kv)))
    model = CpuOverheadModel.fit(samples)
    assert model.terms["mixed_graph"].per_kv_token_s == model.terms["decode_graph"].per_kv_token_s
    assert model.terms["mixed_graph"].per_kv_token_s == pytest.approx(per_kv, rel=0.05)
    assert model.terms["mixed_graph"].constant_s > model.terms["decode_graph"].constant_s
    heavy_mixed = StepPath(StepKind.MIXED, cuda_graph=True)
    assert model.seconds(heavy_mixed, 48, 2048, 100_000) == pytest.approx(
        constants["mixed_graph"] + per_seq * 48 + per_kv * 100_000, rel=0.05)


def test_a_synchronous_capture_at_a_new_attention_shape_pays_the_first_shape_extra():
    overhead = CpuOverheadModel(graph_capture_s=0.030, new_shape_eager_s=0.050)
    captured: set = set()
    first = StepPath(StepKind.MIXED, cuda_graph=True, padded_tokens=512, engine_path="varlen", padded_kv=16896,
                     padded_seqlen_k=512)
    # The same padded query and KV tokens under another longest-sequence key: a new graph, a known shape.
    same_shape = StepPath(StepKind.MIXED, cuda_graph=True, padded_tokens=512, engine_path="varlen", padded_kv=16896,
                          padded_seqlen_k=1024)
    other_shape = StepPath(StepKind.MIXED, cuda_graph=True, padded_tokens=576, engine_path="varlen", padded_kv=16896,
                           padded_seqlen_k=512)
    assert overhead.sync_capture_seconds(first, captured) == pytest.approx(0.080)
    assert overhead.sync_capture_seconds(first, captured) == 0.0  # replayed
    assert overhead.sync_capture_seconds(same_shape, captured) == pytest.approx(0.030)
    assert overhead.sync_capture_seconds(other_shape, captured) == pytest.approx(0.080)
    assert overhead.sync_capture_seconds(StepPath(StepKind.MIXED, padded_tokens=640), captured) == 0.0  # eager
    # Without the extra (calibrations before it) every capture pays graph_capture_s, as before.
    plain = CpuOverheadModel(graph_capture_s=0.030)
    fresh: set = set()
    assert [plain.sync_capture_seconds(p, fresh) for p in (first, same_shape, other_shape)] == [0.030] * 3

"""The platform's host-overhead calibration: fitted across models, stored in generations, and used
by simulate/validate when no --cpu-overhead file is given."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
from click.testing import CliRunner

from dooly.cli import cli
from dooly.errors import DoolyError
from dooly.fit import synthetic as syn
from dooly.sim.calibration import (
    KV_GROUPS,
    KV_TOKENS,
    CacheGroups,
    Calibration,
    CalibrationKey,
    HostSample,
    PathTerms,
    find_calibration,
    fit_calibration,
    fit_path_terms,
    list_calibrations,
    missing_calibration,
    read_calibration,
    write_calibration,
)
from dooly.sim.schedulers import TransformersCBScheduler

TOY = syn.TOY_MODELS[0]
KEY = CalibrationKey("GPU-X", "transformers", "5.17.0", "paged|sdpa", cuda_graphs=False)
# Host cost of the eager paths: launches per layer, plus shared slopes.
TRUTH = {
    "decode": PathTerms(constant_s=0.002, per_layer_s=4e-4, per_sequence_s=2e-5, per_token_s=0.0, per_kv_token_s=1e-9),
    "mixed": PathTerms(constant_s=0.004, per_layer_s=6e-4, per_sequence_s=2e-5, per_token_s=1e-6, per_kv_token_s=1e-9),
}
MAX_BATCH_TOKENS = 2048


def _samples(layers: int, rng: random.Random, noise: float = 0.0, steps: int = 150) -> list[HostSample]:
    """A calibration run's steps: decodes of varying batch, and mixed steps that (as in the real
    engine) nearly all fill max_batch_tokens."""
    out = []
    for _ in range(steps):
        seqs = rng.randint(1, 64)
        kv = seqs * rng.randint(100, 3000)
        host = TRUTH["decode"].for_layers(layers).seconds(seqs, seqs, kv) * rng.uniform(1 - noise, 1 + noise)
        out.append(HostSample("decode", layers, seqs, seqs, kv, host, f"m{layers}"))
    for _ in range(steps // 5):
        seqs, tokens = rng.randint(2, 24), MAX_BATCH_TOKENS - rng.randint(0, 3)
        kv = tokens + seqs * rng.randint(100, 3000)
        host = TRUTH["mixed"].for_layers(layers).seconds(seqs, tokens, kv) * rng.uniform(1 - noise, 1 + noise)
        out.append(HostSample("mixed", layers, seqs, tokens, kv, host, f"m{layers}"))
    return out


def test_a_calibration_fitted_on_other_models_predicts_a_new_layer_count():
    rng = random.Random(0)
    samples = [s for layers in (16, 28, 42) for s in _samples(layers, rng)]
    terms = fit_path_terms(samples)
    unseen = 32
    for key, truth in TRUTH.items():
        for sizes in ((8, 8 if key == "decode" else 2048, 20_000), (48, 48 if key == "decode" else 2040, 90_000)):
            expected = truth.for_layers(unseen).seconds(*sizes)
            assert terms[key].for_layers(unseen).seconds(*sizes) == pytest.approx(expected, rel=0.02)
    assert terms["mixed"].per_layer_s == pytest.approx(TRUTH["mixed"].per_layer_s, rel=0.05)


def test_terms_hold_still_between_runs_when_mixed_steps_all_fill_the_batch():
    """One model, two noisy runs: the mixed constant must not jump between "all constant" and
    "all per-token" (what a mixed path fitted on its own does when T is always ~2048)."""
    from dooly.sim.step_model import CpuOverheadModel

    constants, legacy = [], []
    for seed in range(6):
        samples = _samples(28, random.Random(seed), noise=0.05)
        constants.append(fit_path_terms(samples)["mixed"].for_layers(28).constant_s)
        legacy.append(CpuOverheadModel.fit([(s.key, s.num_seqs, s.num_tokens, s.kv_tokens, s.host_s) for s in samples])
                      .terms["mixed"].constant_s)
    true_constant = TRUTH["mixed"].for_layers(28).constant_s
    assert max(constants) - min(constants) < 0.15 * true_constant
    assert all(c == pytest.approx(true_constant, rel=0.15) for c in constants)
    # The per-path solver it replaces for shared calibrations does swing (kept for `dooly overhead`).
    assert max(legacy) - min(legacy) > max(constants) - min(constants)


def _calibration(version: str = "5.17.0", constant: float = 0.003) -> Calibration:
    rng = random.Random(1)
    samples = [s for layers in (16, 32) for s in _samples(layers, rng)]
    key = CalibrationKey(KEY.platform, KEY.engine, version, KEY.backend, KEY.cuda_graphs)
    calibration = fit_calibration(key, samples, inputs=[{"run": "a", "model": "m16"}, {"run": "b", "model": "m32"}])
    calibration.terms["decode"] = PathTerms(constant_s=constant)
    return calibration


def test_generations_are_written_whole_and_the_newest_is_read(tmp_path):
    from dooly.store.backends import open_store

    store = open_store(str(tmp_path / "db"))
    assert read_calibration(store, KEY) is None
    first = write_calibration(store, _calibration(constant=0.001))
    second = write_calibration(store, _calibration(constant=0.002))
    assert first.endswith("gen-000001.json") and second.endswith("gen-000002.json")
    assert "platform=GPU-X/engine=transformers/engine_version=5.17.0/backend=paged~7Csdpa/graphs=off/" in second
    newest = read_calibration(store, KEY)
    assert newest is not None and newest.generation == 2 and newest.terms["decode"].constant_s == 0.002
    write_calibration(store, _calibration(version="5.18.0", constant=0.005))
    assert len(list_calibrations(store)) == 2
    picked = find_calibration(store, platform="GPU-X", engine="transformers", backend="paged|sdpa", cuda_graphs=False)
    assert picked is not None and picked.key.engine_version == "5.18.0"
    assert find_calibration(store, platform="GPU-X", engine="transformers", backend="paged|sdpa", cuda_graphs=True) is None
    model = newest.for_model(24, "m24")
    assert model.terms["decode"].constant_s == pytest.approx(0.002)
    assert "generation 2" in model.source and "m24 (24 layers)" in model.source


def test_async_batching_has_calibrations_of_its_own(tmp_path):
    from dooly.store.backends import open_store

    store = open_store(str(tmp_path / "db"))
    write_calibration(store, _calibration(constant=0.001))
    asynchronous = _calibration(constant=0.004)
    asynchronous.key = CalibrationKey(KEY.platform, KEY.engine, KEY.engine_version, KEY.backend, KEY.cuda_graphs,
                                      async_batching=True)
    asynchronous.post_capture_device_s = 0.02
    written = write_calibration(store, asynchronous)
    assert written.endswith("/graphs=off/async=on/gen-000001.json")
    assert {k.async_batching for k in list_calibrations(store)} == {False, True}
    sync = find_calibration(store, platform="GPU-X", engine="transformers", backend="paged|sdpa", cuda_graphs=False)
    found = find_calibration(store, platform="GPU-X", engine="transformers", backend="paged|sdpa", cuda_graphs=False,
                             async_batching=True)
    assert sync is not None and sync.terms["decode"].constant_s == 0.001 and not sync.key.async_batching
    assert found is not None and found.terms["decode"].constant_s == 0.004 and found.key.async_batching
    assert found.for_model(24).post_capture_device_s == pytest.approx(0.02)
    assert "async batching" in found.describe()
    assert find_calibration(store, platform="GPU-X", engine="transformers", backend="paged|sdpa", cuda_graphs=True,
                            async_batching=True) is None
    again = Calibration.from_dict(json.loads(json.dumps(found.to_dict())))
    assert again.key == found.key and again.post_capture_device_s == pytest.approx(0.02)


def test_bad_documents_are_refused():
    good = _calibration().to_dict()
    assert Calibration.from_dict(json.loads(json.dumps(good))).terms.keys() == _calibration().terms.keys()
    with pytest.raises(DoolyError, match="schema"):
        Calibration.from_dict({**good, "schema": "dooly.calibration/9"})
    with pytest.raises(DoolyError, match=">= 0"):
        Calibration.from_dict({**good, "terms": {"decode": {"constant_s": -1.0}}})
    with pytest.raises(DoolyError, match="not one of"):
        Calibration.from_dict({**good, "terms": {"warp": {"constant_s": 1.0}}})


# ---------------------------------------------------------------------------------------------
# simulate / validate pick the store's calibration
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted_store(tmp_path_factory) -> str:
    """A local store with one synthetic model's shards and inventory, merged and fitted."""
    from dooly.store.backends import open_store
    from dooly.store.documents import write_json
    from dooly.store.merge import merge_store
    from dooly.store.shards import write_shard

    root = str(tmp_path_factory.mktemp("db"))
    store = open_store(root)
    write_shard(store, syn.snapshot_table((TOY,)), run_id="synthetic", chunk_index=0)
    write_json(store, syn.inventory_store_key(TOY), syn.inventory(TOY))
    merge_store(store)
    result = CliRunner().invoke(cli, ["fit", "--store", root, "--folds", "2", "--output", "json"])
    assert result.exit_code == 0, result.output
    return root


def _simulate(store: str, *extra: str):
    args = ["simulate", TOY.model_id, "--store", store, "--platform", syn.PLATFORM, "--backend", syn.BACKEND,
            "--requests", "20", "--rate", "20", *extra, "--output", "json"]
    return CliRunner().invoke(cli, args)


def test_simulate_refuses_without_a_calibration_and_uses_the_stores(fitted_store, tmp_path):
    import shutil

    from dooly.store.backends import open_store

    store_dir = str(tmp_path / "db")
    shutil.copytree(fitted_store, store_dir)
    refused = _simulate(store_dir)
    assert refused.exit_code == 2
    assert refused.stderr.count("\n") == 1 and "no host-overhead calibration" in refused.stderr
    bare = _simulate(store_dir, "--no-cpu-overhead")
    assert bare.exit_code == 0, bare.output
    assert json.loads(bare.stdout)["cpu_overhead"].startswith("none")

    constant = 0.05  # large enough to show in every request's latency
    key = CalibrationKey(syn.PLATFORM, syn.ENGINE, "5.17.0", syn.BACKEND,
                         cuda_graphs=any(TransformersCBScheduler().config.cuda_graph_booleans))
    write_calibration(open_store(store_dir, create=False),
                      Calibration(key=key, terms={"default": PathTerms(constant_s=constant)}, inputs=[{"run": "r", "model": "x"}]))
    served = _simulate(store_dir)
    assert served.exit_code == 0, served.output
    summary = json.loads(served.stdout)
    assert summary["cpu_overhead"].startswith("store calibration generation 1")
    slower = summary["tpot_s"]["mean"] - json.loads(bare.stdout)["tpot_s"]["mean"]
    assert slower == pytest.approx(constant, rel=0.05)

    # Async batching is served only by a calibration of its own.
    refused_async = _simulate(store_dir, "--set", "use_async_batching=true")
    assert refused_async.exit_code == 2
    assert refused_async.stderr.count("\n") == 1 and refused_async.stderr.startswith("error:")
    assert "no host-overhead calibration" in refused_async.stderr and "async batching" in refused_async.stderr
    async_key = CalibrationKey(key.platform, key.engine, key.engine_version, key.backend, key.cuda_graphs,
                               async_batching=True)
    write_calibration(open_store(store_dir, create=False),
                      Calibration(key=async_key, terms={"default": PathTerms(constant_s=constant)},
                                  inputs=[{"run": "r", "model": "x"}]))
    served_async = _simulate(store_dir, "--set", "use_async_batching=true")
    assert served_async.exit_code == 0, served_async.output
    async_summary = json.loads(served_async.stdout)
    assert "async batching" in async_summary["cpu_overhead"]
    assert async_summary["settings"]["use_async_batching"] is True


def test_layer_terms_are_kept_only_where_they_predict_a_left_out_model():
    from dooly.sim.calibration import choose_layer_terms

    rng = random.Random(2)
    scaling = [s for layers in (16, 28, 32, 42) for s in _samples(layers, rng)]
    kept, scores = choose_layer_terms(scaling)
    assert kept and scores["with_layer_terms"] < scores["pooled"]
    # Host time that does not follow the layer count (each run's own level, as between leases).
    levels = {16: 1.3, 28: 0.8, 32: 1.0, 42: 1.1}
    flat = [HostSample(s.key, s.num_layers, s.num_seqs, s.num_tokens, s.kv_tokens,
                       levels[s.num_layers] * TRUTH[s.key].for_layers(28).seconds(s.num_seqs, s.num_tokens, s.kv_tokens))
            for s in scaling]
    kept, scores = choose_layer_terms(flat)
    assert not kept
    three = _samples(16, rng) + _samples(28, rng) + _samples(42, rng)
    assert not choose_layer_terms(three)[0]  # three models: too few to leave one out and still choose


# A gemma-2-like model: one full-attention group and one sliding group of a small window (so that
# hand-made steps cross it).
SLIDING = CacheGroups(full=1, sliding=1, window=16)
# Host cost per KV index entry of a group, and the extra per entry of a sliding group.
GROUP_ENTRY_S = 1.5e-7
SLIDING_ENTRY_S = 3e-7


def test_kv_reads_of_a_model_without_sliding_groups():
    assert CacheGroups().kv_reads([10, 20]) == (30, 0)
    assert CacheGroups(full=2).kv_reads([10, 20]) == (60, 0)  # two full-attention groups index every token twice
    assert CacheGroups().kv_reads([]) == (0, 0)


def test_kv_reads_of_a_model_with_sliding_groups_cap_each_sequence_at_the_window():
    # 10 tokens fit the window of 16, 20 read 16 of it: sliding entries 10 + 16; all groups 30 + 26.
    assert SLIDING.kv_reads([10, 20]) == (56, 26)
    assert CacheGroups(full=1, sliding=2, window=16).kv_reads([10, 20]) == (30 + 52, 52)


def test_host_samples_carry_the_groups_kv_reads_of_each_step():
    from dooly.sim.validate import MeasuredStep, host_sample

    # A chunk of 5 new tokens after 3 cached, and a decode at 20 cached: 8 and 21 KV tokens read.
    step = MeasuredStep(0, 0.0, 0.01, prefill=[(5, 3)], decode_ctx=[20])
    sample = host_sample("mixed", 42, step, 0.004, "gemma-like", SLIDING)
    assert (sample.num_seqs, sample.num_tokens, sample.kv_tokens) == (2, 6, 29)
    assert (sample.kv_group_tokens, sample.kv_sliding_tokens) == (29 + 8 + 16, 8 + 16)
    plain = host_sample("mixed", 42, step, 0.004, "llama-like", CacheGroups())
    assert (plain.group_tokens, plain.kv_sliding_tokens) == (29, 0)


def test_a_scheduler_built_for_a_model_knows_its_groups():
    from dooly.sim.options import with_model_groups
    from dooly.sim.schedulers import make_scheduler

    def groups(model: str) -> CacheGroups:
        return CacheGroups.from_scheduler(make_scheduler("transformers", with_model_groups(model, "transformers", {})))

    assert groups("meta-llama/Llama-3.2-1B") == CacheGroups()
    gemma = groups("google/gemma-2-9b")
    assert (gemma.full, gemma.sliding) == (1, 1) and gemma.window > 0


def test_a_calibration_without_group_terms_loads_with_zeros_and_charges_as_before():
    old = {"schema": "dooly.calibration/1",
           "key": {"platform": "GPU-X", "engine": "transformers", "engine_version": "5.17.0", "backend": "paged|sdpa",
                   "cuda_graphs": True},
           "terms": {"decode_graph": {"constant_s": 0.002, "per_layer_s": 0.0, "per_sequence_s": 4e-5, "per_token_s": 1e-6,
                                      "per_kv_token_s": 3e-7, "per_kv_token_layer_s": 2e-9}}}
    calibration = Calibration.from_dict(old)
    terms = calibration.terms["decode_graph"]
    assert terms.per_kv_group_token_s == 0.0 and terms.per_kv_sliding_token_s == 0.0
    layers = 28
    expected = 3e-7 + 2e-9 * layers
    for groups in (CacheGroups(), SLIDING):
        charged = calibration.for_model(layers, "m", groups).terms["decode_graph"]
        assert charged.per_kv_token_s == pytest.approx(expected)
    assert Calibration.from_dict(json.loads(json.dumps(calibration.to_dict()))).terms == calibration.terms


def _group_samples(groups: CacheGroups, layers: int, rng: random.Random, steps: int = 150) -> list[HostSample]:
    """Decode steps whose host time is a constant, a per-sequence cost and a cost per KV index
    entry of the model's cache groups (and more per sliding entry): the engine's graph paths."""
    out = []
    for _ in range(steps):
        contexts = [rng.randint(1, 40) for _ in range(rng.randint(1, 32))]
        entries, sliding = groups.kv_reads(contexts)
        host = 0.002 + 4e-5 * len(contexts) + GROUP_ENTRY_S * entries + SLIDING_ENTRY_S * sliding
        out.append(HostSample("decode_graph", layers, len(contexts), len(contexts), sum(contexts), host,
                              f"m{layers}-{groups.sliding}", entries, sliding))
    return out


def test_the_group_form_picks_up_a_group_dependent_cost_the_token_form_cannot():
    rng = random.Random(3)
    models = [(CacheGroups(), 16), (CacheGroups(), 28), (CacheGroups(full=2), 32), (SLIDING, 42), (SLIDING, 26)]
    samples = [s for groups, layers in models for s in _group_samples(groups, layers, rng)]
    fitted = fit_path_terms(samples, kv_regressors=KV_GROUPS)["decode_graph"]
    assert fitted.per_kv_group_token_s == pytest.approx(GROUP_ENTRY_S, rel=0.05)
    assert fitted.per_kv_sliding_token_s == pytest.approx(SLIDING_ENTRY_S, rel=0.05)
    assert fitted.per_kv_token_s == 0.0 and fitted.per_kv_token_layer_s == 0.0

    def worst(terms: PathTerms) -> float:
        return max(abs(terms.seconds(s) - s.host_s) / s.host_s for s in samples)

    assert worst(fitted) < 0.01
    tokens = fit_path_terms(samples, kv_regressors=KV_TOKENS)["decode_graph"]
    assert tokens.per_kv_group_token_s == 0.0 and tokens.per_kv_sliding_token_s == 0.0
    assert worst(tokens) > 5 * worst(fitted)
    calibration = fit_calibration(KEY, samples)
    assert calibration.fit["kv_regressors"] == KV_GROUPS
    assert calibration.fit["leave_one_model_out_host_error"]["pooled"] < 0.01


def test_unknown_kv_regressors_are_refused():
    rng = random.Random(4)
    with pytest.raises(DoolyError, match="KV regressors"):
        fit_path_terms(_group_samples(CacheGroups(), 16, rng), kv_regressors="layers")


def test_an_async_calibration_keeps_its_input_copy_and_old_documents_load_without_one(tmp_path):
    from dooly.store.backends import open_store

    rng = random.Random(4)
    key = CalibrationKey(KEY.platform, KEY.engine, KEY.engine_version, KEY.backend, True, async_batching=True)
    mask = TransformersCBScheduler({"use_async_batching": True}).async_input_bytes
    fitted = fit_calibration(key, _samples(16, rng), input_copies=[(0.020, mask), (0.022, mask), (0.030, 2 * mask)])
    # Scaled to the largest size (twice the mask): 40, 44 and 30 ms; the median is kept.
    assert fitted.input_copy_bytes == 2 * mask
    assert fitted.input_copy_s == pytest.approx(0.040)
    store = open_store(str(tmp_path / "db"))
    write_calibration(store, fitted)
    found = read_calibration(store, key)
    assert found is not None and found.input_copy_s == pytest.approx(0.040) and found.input_copy_bytes == 2 * mask
    model = found.for_model(16)
    assert model.input_copy_seconds(mask) == pytest.approx(0.020)
    # A generation written before the copy was modelled: no copy, whatever the engine copies.
    old = fitted.to_dict()
    del old["input_copy_s"], old["input_copy_bytes"]
    legacy = Calibration.from_dict(json.loads(json.dumps(old)))
    assert legacy.input_copy_s == 0.0 and legacy.input_copy_bytes == 0
    assert legacy.for_model(16).input_copy_seconds(mask) == 0.0
    with pytest.raises(DoolyError, match="finite and >= 0"):
        Calibration.from_dict({**old, "input_copy_s": -1.0})
    with pytest.raises(DoolyError, match="whole number"):
        Calibration.from_dict({**old, "input_copy_bytes": 1.5})


def test_the_committed_async_calibrations_load():
    """The store's async generations as committed: the first, fitted before the copy was
    modelled, has none; the newest has the copy of the 1.08 GB mask (~20 ms) and no stall left."""
    from pathlib import Path

    from dooly.sim.calibration import generation_key
    from dooly.store.backends import open_store

    store = open_store(str(Path(__file__).resolve().parents[2] / "data" / "h100" / "db"), create=False)
    key = CalibrationKey("NVIDIA-H100-80GB-HBM3", "transformers", "5.17.0", "paged|sdpa", True, async_batching=True)
    first = Calibration.from_dict(json.loads(store.get_bytes(generation_key(key, 1))))
    assert first.input_copy_s == 0.0 and first.post_capture_device_s > 0
    newest = read_calibration(store, key)
    assert newest is not None and newest.generation > 1
    assert newest.input_copy_bytes == TransformersCBScheduler({"use_async_batching": True, "num_blocks": 1024,
                                                              "block_size": 256, "max_batch_tokens": 2048}).async_input_bytes
    assert 0.015 < newest.input_copy_s < 0.025
    assert newest.post_capture_device_s < 0.2 * first.post_capture_device_s
    assert newest.graph_capture_s < first.graph_capture_s


def test_repeats_of_one_calib_run_under_one_name_are_each_fitted(monkeypatch, tmp_path):
    """Runs given as --ground-truth directories of one basename (repeats of one calib run) share
    their name; each run's own steps go into the fit, not the last one's once per repeat."""
    from dooly.sim import calibration_commands
    from dooly.sim.calibration_commands import CalibrationRun, calibrate_runs

    rng = random.Random(3)
    runs = [CalibrationRun(tmp_path / f"lease-{i}", "m32.calib", "m32", KEY, "bfloat16", {}) for i in range(3)]
    steps = {id(run): _samples(32, rng, steps=10 * (i + 1)) for i, run in enumerate(runs)}
    monkeypatch.setattr(calibration_commands, "run_samples", lambda run, *args: (steps[id(run)], [], 32))
    (calibration,) = calibrate_runs(runs, "unused")
    assert [item["steps"] for item in calibration.inputs] == [len(steps[id(run)]) for run in runs]
    assert calibration.fit["models"]["m32"]["steps"] == sum(len(s) for s in steps.values())


def test_synchronous_captures_are_priced_apart_by_whether_their_attention_shape_was_new():
    from dooly.sim.calibration_commands import capture_novelty
    from dooly.sim.step_model import StepKind, StepPath

    paths = [StepPath(StepKind.MIXED, cuda_graph=True, padded_tokens=q, engine_path="varlen", padded_kv=kv,
                      padded_seqlen_k=k) for q, kv, k in ((512, 16896, 512), (512, 16896, 1024), (576, 16896, 512))]
    assert capture_novelty(paths) == [True, False, True]
    rng = random.Random(5)
    samples = [s for layers in (16, 32) for s in _samples(layers, rng)]
    # A capture's excess is over the ordinary step the calibration fits for its path.
    ordinary = fit_calibration(KEY, samples).terms["decode"]

    def capture(layers: int, new: bool) -> tuple[HostSample, None]:
        step = HostSample("decode", layers, 16, 16, 16_000, 0.0, f"m{layers}")
        cost = 0.020 + 0.0005 * layers + (0.060 if new else 0.0) + rng.uniform(-0.002, 0.002)
        return dataclasses.replace(step, host_s=ordinary.seconds(step) + cost), None

    flags = [new for _ in range(9) for new in (True, True, True, False)]
    captures = [capture(layers, new) for layers in (16, 32) for new in flags]
    split = fit_calibration(KEY, samples, captures, capture_new=flags * 2)
    assert split.graph_capture_s == pytest.approx(0.020, abs=0.003)
    assert split.graph_capture_per_layer_s == pytest.approx(0.0005, abs=0.0001)
    assert split.new_shape_eager_s == pytest.approx(0.060, abs=0.003)
    assert split.fit["captures"] == {"known_shape": 18, "new_shape": 54}
    # One line over every capture where the flags are not given, or are all of one kind.
    for capture_new in ((), [True] * len(captures)):
        single = fit_calibration(KEY, samples, captures, capture_new=capture_new)
        assert single.new_shape_eager_s == 0.0
        assert single.graph_capture_s + 24 * single.graph_capture_per_layer_s == pytest.approx(0.092, abs=0.004)


def test_a_fleets_rotated_calib_runs_are_each_recorded_and_fitted_from_the_store(monkeypatch, tmp_path):
    """The fleet's shard pods each bench one of the fleet's models (shard i: models[i % n]) into a
    directory of one name and record it; `--from-store` (the merge Job) fits every shard's run, two
    runs of one model included, each with its own steps."""
    from dooly.sim import calibration_commands

    models = {"meta-llama/Llama-3.2-1B": 16, "meta-llama/Llama-3.2-3B": 28, "meta-llama/Llama-3.1-8B": 32}
    names = list(models)
    store = tmp_path / "db"
    store.mkdir()
    for shard in range(4):
        run = tmp_path / f"pod-{shard}" / "calib"
        run.mkdir(parents=True)
        (run / "bench.json").write_text(json.dumps({
            "model": names[shard % len(names)], "platform": KEY.platform, "backend": KEY.backend, "engine": KEY.engine,
            "stack": {"engine_version": KEY.engine_version}, "started_at_unix": 1000.0 + shard,
        }))
        recorded = CliRunner().invoke(cli, ["calibrate", "--store", str(store), "--ground-truth", str(run),
                                            "--record-only", "--output", "json"])
        assert recorded.exit_code == 0, recorded.output
    rng = random.Random(5)
    steps = {}  # run name -> its samples

    def run_samples(run, *args):
        steps[run.name] = _samples(models[run.model], rng, steps=10 * (len(steps) + 1))
        return steps[run.name], [], models[run.model]

    monkeypatch.setattr(calibration_commands, "run_samples", run_samples)
    fitted = CliRunner().invoke(cli, ["calibrate", "--store", str(store), "--from-store", "--output", "json"])
    assert fitted.exit_code == 0, fitted.output
    [calibration] = json.loads(fitted.output)["calibrations"]
    inputs = calibration["inputs"]
    assert len(inputs) == 4 and len({item["run"] for item in inputs}) == 4
    assert sorted(item["model"] for item in inputs) == sorted([*names, names[0]])
    assert [item["steps"] for item in inputs] == [len(steps[item["run"]]) for item in inputs]
    # The stand-in samples name their model by layer count: both 1B runs' steps are in the fit.
    one_b = sum(len(steps[item["run"]]) for item in inputs if item["model"] == names[0])
    assert calibration["fit"]["models"]["m16"]["steps"] == one_b
    assert set(calibration["fit"]["models"]) == {f"m{layers}" for layers in models.values()}


def test_a_backend_the_engine_does_not_serve_is_not_sent_to_dooly_calibrate():
    """A profile-only backend (transformers' paged|flex_attention) has no engine run to calibrate
    from: the missing-calibration line offers a file or no host time, never `dooly calibrate`."""
    from dooly.engines.registry import SERVED_BACKENDS
    from dooly.engines.transformers_cb import ENGINE_BACKENDS

    assert SERVED_BACKENDS["transformers"] == ENGINE_BACKENDS
    common = {"platform": "P", "engine": "transformers", "cuda_graphs": True, "async_batching": False,
              "file_flag": "--cpu-overhead"}
    served = missing_calibration(backend="paged|sdpa", **common)
    assert "run `dooly calibrate`" in served and "--cpu-overhead FILE" in served
    flex = missing_calibration(backend="paged|flex_attention", **common)
    assert "dooly calibrate" not in flex
    assert "does not serve paged|flex_attention" in flex and "--cpu-overhead FILE" in flex and "--no-cpu-overhead" in flex


def test_the_committed_cpu_vllm_calibration_runs_load_with_their_version_and_dtype():
    """data/cpu-vllm's runs predate bench.json's `stack`: their top-level engine version and their
    engine arguments' dtype are read (a float32 CPU run keyed as bfloat16 finds no fitted models)."""
    from pathlib import Path

    from dooly.sim.calibration_commands import CalibrationRun

    directory = Path(__file__).resolve().parents[2] / "data" / "cpu-vllm" / "gt" / "Qwen2.5-0.5B" / "calibration"
    assert "stack" not in json.loads((directory / "bench.json").read_text())
    run = CalibrationRun.load(directory)
    assert (run.key.engine, run.key.engine_version, run.key.backend, run.key.cuda_graphs) == ("vllm", "0.32.0",
                                                                                            "CPU_ATTN", False)
    assert run.dtype == "float32"

"""Engine paths the step model must see: CUDA-graph padding of tokens and KV reads, graph captures on
first-seen shapes, and the overhead calibration that measures both."""

from __future__ import annotations

import pytest

from dooly.sim.schedulers import TransformersCBScheduler
from dooly.sim.step_model import AnalyticStepModel, CpuOverheadModel, StepKind, StepPath, padded_composition
from dooly.sim.validate import GroundTruth, MeasuredStep, calibrate_overhead, replay_steps

CONSTANT_S = 0.004
PER_SEQ_S = 2e-5
CAPTURE_S = 0.05


class TokensAndKv:
    """A step model whose answer depends only on the totals T and K (like dense-masked attention)."""

    def step_seconds(self, prefill, decode_ctx):
        tokens = sum(q for q, _ in prefill) + len(decode_ctx)
        kv = sum(q + c for q, c in prefill) + sum(decode_ctx) + len(decode_ctx)
        return 1e-6 * tokens + 1e-8 * tokens * kv


def test_padded_composition_has_the_padded_totals():
    prefill, decode = [(30, 100)], [500, 700]
    path = StepPath(StepKind.MIXED, cuda_graph=True, padded_tokens=64, padded_kv=16384 + 64)
    new_prefill, new_decode = padded_composition(prefill, decode, path)
    assert sum(q for q, _ in new_prefill) + len(new_decode) == 64
    assert sum(q + c for q, c in new_prefill) + sum(new_decode) + len(new_decode) == 16384 + 64
    assert len(new_decode) == len(decode)  # decodes stay decodes


def test_graph_path_pads_cached_tokens_to_the_interval():
    scheduler = TransformersCBScheduler({"use_cuda_graph": True, "num_blocks": 1024, "block_size": 256})
    path = scheduler.path_for([(100, 0)], [300, 200])
    assert path.cuda_graph and path.padded_tokens == 128  # 102 tokens -> q interval 64
    assert path.padded_kv == 16384 + 128  # 500 cached -> kv interval 16384, plus the padded queries
    eager = TransformersCBScheduler({"use_cuda_graph": False}).path_for([(100, 0)], [300, 200])
    assert not eager.cuda_graph and eager.padded_kv == 0 and eager.padded_tokens == 102


def _synthetic_run(scheduler, model, compositions):
    """Steps whose wall time is the model's device time + known overhead + a capture on first-seen shapes."""
    steps, seen = [], set()
    for index, (prefill, decode) in enumerate(compositions):
        path = scheduler.path_for(prefill, decode)
        padded = padded_composition(prefill, decode, path)
        seconds = model.step_seconds(*padded) + CONSTANT_S + PER_SEQ_S * (len(prefill) + len(decode))
        shape = CpuOverheadModel.graph_shape(path)
        if shape not in seen:
            seen.add(shape)
            seconds += CAPTURE_S
        steps.append(MeasuredStep(index, float(index), seconds, prefill, decode))
    return GroundTruth([], steps)


def test_calibration_recovers_host_terms_and_capture_cost():
    scheduler = TransformersCBScheduler({"use_cuda_graph": True, "num_blocks": 2048, "block_size": 256})
    model = TokensAndKv()
    compositions = [([], [100 * (i % 7) + 50] * (1 + i % 13)) for i in range(60)]
    compositions += [([(40 + 37 * (i % 5), 20 * i)], [300] * (i % 4)) for i in range(30)]
    truth = _synthetic_run(scheduler, model, compositions)
    fitted = calibrate_overhead([(truth, scheduler)], model)
    decode = fitted.terms["decode_graph"]
    assert decode.constant_s == pytest.approx(CONSTANT_S, rel=0.02)
    assert decode.per_sequence_s == pytest.approx(PER_SEQ_S, rel=0.05)
    assert fitted.graph_capture_s == pytest.approx(CAPTURE_S, rel=0.02)
    replayed = replay_steps(truth.steps, model, fitted, scheduler.path_for)
    for step, predicted in zip(truth.steps, replayed):
        assert predicted == pytest.approx(step.duration_s, rel=0.01)


def test_replay_without_padding_underestimates_graph_steps():
    """The padded extents are what the device runs: dropping them must show as an error."""
    scheduler = TransformersCBScheduler({"use_cuda_graph": True, "num_blocks": 2048, "block_size": 256})
    model = TokensAndKv()
    truth = _synthetic_run(scheduler, model, [([], [1000] * 4)] * 10)
    unpadded = [model.step_seconds(s.prefill, s.decode_ctx) + CONSTANT_S for s in truth.steps[1:]]
    assert all(u < 0.9 * s.duration_s for u, s in zip(unpadded, truth.steps[1:]))


def test_capture_cost_round_trips_and_bad_values_are_refused(tmp_path):
    from dooly.errors import DoolyError

    model = CpuOverheadModel(graph_capture_s=0.03)
    path = tmp_path / "overhead.json"
    model.save(path)
    assert CpuOverheadModel.load(path).graph_capture_s == pytest.approx(0.03)
    with pytest.raises(DoolyError, match="graph_capture_s"):
        CpuOverheadModel.from_dict({"terms": {}, "graph_capture_s": -1})


def test_analytic_model_accepts_the_path():
    model = AnalyticStepModel()
    path = StepPath(StepKind.DECODE, cuda_graph=True, padded_tokens=8, padded_kv=4096)
    assert model.step_seconds([], [100, 200], path=path) > 0


# An async-batching run as the bench probe records it (prepare(N) -> launch(N) -> update(N-1) per
# row): known host work, capture cost, input copy and post-capture stall, to be read back.
ASYNC_DEVICE_S = 0.030
ASYNC_PREPARE_S, ASYNC_LAUNCH_S, ASYNC_UPDATE_S = 0.002, 0.0004, 0.0002
ASYNC_STALL_S = 0.020
ASYNC_COPY_S = 0.020  # shorter than the device step: hidden except after a capture
ASYNC_LONG_COPY_S = 0.045  # longer: every step runs at the copy's pace


class ConstantDevice:
    def step_seconds(self, prefill, decode_ctx):
        return ASYNC_DEVICE_S


def _async_rows(captured_at: set[int], rows: int = 40, copy: float = 0.0, stall: float = 0.0,
                new_shape_host: float = 0.0) -> list[MeasuredStep]:
    """The engine's timeline: each launch's input copy starts at max(launch, end of the previous
    copy) and the device work waits for it; the probe's device time runs from the stream being
    free (max(previous device end, launch)) to the end of the device work. Every row has one
    attention shape, so the first capture's eager run is the shape's first: it holds the host
    `new_shape_host` from its launch before its kernels start (the device's work in flight and the
    input copy hide it where they are longer; the eager run's own device time adds to it)."""
    steps = []
    host, device_end, copy_end = 0.0, 0.0, 0.0
    for k in range(rows):
        ready = host + ASYNC_PREPARE_S
        free = max(device_end, ready)
        copy_end = max(ready, copy_end) + copy
        start = max(free, copy_end)
        if k in captured_at:  # eager run, synchronise, capture: the launch returns after all of it
            if k == min(captured_at):
                start = max(start, ready + new_shape_host)
            eager_end = start + ASYNC_DEVICE_S
            launched = eager_end + CAPTURE_S
            end_of_device = launched
        else:
            launched = ready + ASYNC_LAUNCH_S
            end_of_device = start + ASYNC_DEVICE_S + (stall if k - 1 in captured_at else 0.0)
        update = max(0.0, device_end - launched) + ASYNC_UPDATE_S
        steps.append(MeasuredStep(k, host, launched + update - host, [], [100 + k], prepare_s=ASYNC_PREPARE_S,
                                  forward_s=launched - ready, update_s=update, device_s=end_of_device - free,
                                  graph_captured=k in captured_at))
        host, device_end = launched + update, end_of_device
    return steps


ASYNC_SCHEDULER = {"use_async_batching": True, "use_cuda_graph": True}


def test_async_runs_are_calibrated_from_the_probe_split_not_the_wall_time():
    from dooly.sim.validate import async_host_samples

    scheduler = TransformersCBScheduler(ASYNC_SCHEDULER)
    truth = GroundTruth([], _async_rows({0, 1, 12}, stall=ASYNC_STALL_S))
    measured = async_host_samples(truth, scheduler, ConstantDevice(), input_copy_s=0.0, split_new_shapes=True)
    # Every ordinary row's host work, though the row's wall time is mostly the wait for the device.
    assert [s.host_s for s in measured.samples] == pytest.approx([ASYNC_PREPARE_S + ASYNC_LAUNCH_S + ASYNC_UPDATE_S] * 37)
    assert max(s.duration_s for s in truth.steps[3:12]) > ASYNC_DEVICE_S - 0.001
    # Row 0 ran the run's one attention shape first: priced apart (`new_shapes`), rows 1 and 12 capture it again.
    assert [c.host_s for c, _ in measured.captures] == pytest.approx([ASYNC_PREPARE_S + ASYNC_UPDATE_S + CAPTURE_S] * 2)
    # (its launch less the eager run's device time; the device was free for it at once)
    assert [v for launch in measured.new_shapes for v in launch] == pytest.approx([CAPTURE_S, 0.0])
    # Row 1 is a capture itself: only rows 2 and 13 follow a capture as ordinary steps.
    assert measured.stalls == pytest.approx([ASYNC_STALL_S, ASYNC_STALL_S])
    assert measured.input_copy_s == 0.0


def test_an_async_runs_input_copy_is_fitted_and_not_counted_as_capture_or_stall():
    from dooly.sim.validate import async_host_samples

    scheduler = TransformersCBScheduler(ASYNC_SCHEDULER)
    truth = GroundTruth([], _async_rows({0, 1, 12}, copy=ASYNC_COPY_S))
    measured = async_host_samples(truth, scheduler, ConstantDevice(), split_new_shapes=True)
    assert measured.input_copy_s == pytest.approx(ASYNC_COPY_S)
    assert measured.stalls == pytest.approx([0.0, 0.0], abs=1e-9)
    assert [c.host_s for c, _ in measured.captures] == pytest.approx([ASYNC_PREPARE_S + ASYNC_UPDATE_S + CAPTURE_S] * 2)
    # Read as before the copy was modelled, the copy shows as a post-capture stall and inflates captures.
    blind = async_host_samples(truth, scheduler, ConstantDevice(), input_copy_s=0.0, split_new_shapes=True)
    assert blind.stalls == pytest.approx([ASYNC_COPY_S, ASYNC_COPY_S])
    # (row 1 is launched on an idle device and waits for its copy; row 12's copy hides)
    base = ASYNC_PREPARE_S + ASYNC_UPDATE_S + CAPTURE_S
    assert [c.host_s for c, _ in blind.captures] == pytest.approx([base + ASYNC_COPY_S, base])
    fitted = calibrate_overhead([(truth, scheduler)], ConstantDevice(), split_new_shapes=True)
    assert fitted.input_copy_s == pytest.approx(ASYNC_COPY_S)
    assert fitted.input_copy_bytes == scheduler.async_input_bytes > 0
    assert fitted.post_capture_device_s == pytest.approx(0.0, abs=1e-9)
    assert fitted.graph_capture_s == pytest.approx(CAPTURE_S - ASYNC_LAUNCH_S, rel=0.05)


NEW_SHAPE_HOST_S = 0.120  # first-shape host work before the eager run's kernels: longer than the copy


def test_an_async_capture_at_a_new_attention_shape_is_priced_from_its_launch():
    from dooly.sim.validate import async_host_samples

    scheduler = TransformersCBScheduler(ASYNC_SCHEDULER)
    truth = GroundTruth([], _async_rows({0, 1, 12}, copy=ASYNC_COPY_S, new_shape_host=NEW_SHAPE_HOST_S))
    measured = async_host_samples(truth, scheduler, ConstantDevice(), split_new_shapes=True)
    # Row 0's launch less its eager device time: the first-shape host work, then the capture; the
    # device was free for the eager run once the copy was done.
    assert [v for launch in measured.new_shapes for v in launch] == pytest.approx(
        [NEW_SHAPE_HOST_S + CAPTURE_S, ASYNC_COPY_S])
    fitted = calibrate_overhead([(truth, scheduler)], ConstantDevice(), split_new_shapes=True)
    # The capture cost is priced on the captures of a known shape, the first-shape work apart.
    assert fitted.graph_capture_s == pytest.approx(CAPTURE_S - ASYNC_LAUNCH_S, rel=0.05)
    assert fitted.new_shape_eager_s == pytest.approx(NEW_SHAPE_HOST_S + ASYNC_LAUNCH_S, rel=0.05)
    # Without the first-shape work the eager run ends with the device: nothing to price.
    plain = calibrate_overhead([(GroundTruth([], _async_rows({0, 1, 12}, copy=ASYNC_COPY_S)), scheduler)], ConstantDevice(),
                               split_new_shapes=True)
    assert plain.new_shape_eager_s == 0.0


def test_by_default_every_async_capture_prices_the_one_capture_cost():
    from dooly.sim.validate import async_host_samples

    scheduler = TransformersCBScheduler(ASYNC_SCHEDULER)
    truth = GroundTruth([], _async_rows({0, 1, 12}, copy=ASYNC_COPY_S, new_shape_host=NEW_SHAPE_HOST_S))
    measured = async_host_samples(truth, scheduler, ConstantDevice())
    # The first run of the shape is a capture like the others, and nothing is priced apart.
    assert len(measured.captures) == 3
    assert measured.new_shapes == []
    fitted = calibrate_overhead([(truth, scheduler)], ConstantDevice())
    assert fitted.new_shape_eager_s == 0.0
    split = calibrate_overhead([(truth, scheduler)], ConstantDevice(), split_new_shapes=True)
    assert split.new_shape_eager_s > 0.0


def test_the_first_shape_fit_takes_a_hidden_eager_run_as_a_bound():
    from dooly.sim.calibration import fit_new_shape_eager

    assert fit_new_shape_eager([]) == 0.0
    # Host-bound launches (launch > device) give the host time; device-bound ones only say "no longer".
    launches = [(0.100, 0.030), (0.090, 0.030), (0.110, 0.030), (0.200, 0.200), (0.250, 0.250)]
    assert fit_new_shape_eager(launches) == pytest.approx(0.100)
    # A median of the launches alone would take the device-bound ones for host time.
    assert sorted(launch for launch, _ in launches)[len(launches) // 2] == pytest.approx(0.110)
    assert fit_new_shape_eager([(0.200, 0.200), (0.250, 0.250)]) == 0.0


def test_a_copy_longer_than_the_step_is_fitted_and_explains_the_device_times():
    from dooly.sim.validate import async_host_samples, compare_async_steps

    scheduler = TransformersCBScheduler(ASYNC_SCHEDULER)
    steps = _async_rows({0, 1, 12}, copy=ASYNC_LONG_COPY_S)
    # Ordinary steps past the captures follow each other at the copy's pace, not the device's.
    assert steps[20].device_s == pytest.approx(ASYNC_LONG_COPY_S)
    measured = async_host_samples(GroundTruth([], steps), scheduler, ConstantDevice())
    assert measured.input_copy_s == pytest.approx(ASYNC_LONG_COPY_S)
    overhead = CpuOverheadModel(input_copy_s=measured.input_copy_s)
    with_copy = compare_async_steps(steps, ConstantDevice(), overhead, scheduler.path_for)
    without = compare_async_steps(steps, ConstantDevice(), CpuOverheadModel(), scheduler.path_for)
    assert with_copy.ape.mean() < 0.1 < 10 < without.ape.mean()


def test_an_async_run_without_the_probe_split_is_refused():
    from dooly.errors import DoolyError
    from dooly.sim.validate import async_host_samples

    scheduler = TransformersCBScheduler({"use_async_batching": True})
    bare = GroundTruth([], [MeasuredStep(k, 0.03 * k, 0.03, [], [100]) for k in range(10)])
    with pytest.raises(DoolyError, match="prepare_s"):
        async_host_samples(bare, scheduler, ConstantDevice())

"""dooly.engines.kernel_trace charges each kernel of a profiled engine run to the step, and the
part of the step, whose host code launched it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dooly.engines import kernel_trace


def launch(category: str, ts: float, correlation: int, external: int) -> dict:
    return {"cat": category, "name": "launch", "ts": ts, "args": {"correlation": correlation, "External id": external}}


def kernel(name: str, ts: float, dur: float, correlation: int, category: str = "kernel") -> dict:
    return {"cat": category, "name": name, "ts": ts, "dur": dur, "args": {"correlation": correlation}}


def test_kernels_are_charged_to_the_part_of_the_step_that_launched_them():
    # perf_counter 10.0 s is trace time 1000 us: the trace clock runs 9_999_000 us behind.
    offset = 1000.0 - 10.0 * kernel_trace.US_PER_S

    def at(seconds: float) -> float:
        return seconds * kernel_trace.US_PER_S + offset
    trace = {"traceEvents": [
        {"cat": "user_annotation", "name": f"{kernel_trace.CLOCK_MARK}@{10.0 * kernel_trace.US_PER_S:.1f}", "ts": 1000.0},
        {"cat": "cpu_op", "name": "aten::_cudnn_attention_forward", "args": {"External id": 7}},
        launch("cuda_runtime", at(20.0005), 1, 0),   # preparing the step's inputs
        launch("cuda_driver", at(20.002), 2, 7),      # in the generation step, through the driver
        launch("cuda_runtime", at(20.003), 3, 0),
        launch("cuda_runtime", at(20.0095), 4, 0),    # in the batch update
        launch("cuda_runtime", at(30.0), 5, 0),       # another step altogether
        kernel("void at::native::fill_kernel", at(20.001), 100.0, 1, "gpu_memset"),
        kernel("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", at(20.0025), 2000.0, 2),
        kernel("nvjet_sm90_tst_192x176", at(20.005), 500.0, 3),
        kernel("Memcpy DtoH", at(20.0096), 30.0, 4, "gpu_memcpy"),
        kernel("nvjet_sm90_tst_192x176", at(30.001), 999.0, 5),
    ]}
    step = SimpleNamespace(start_s=20.0, prepare_s=0.001, forward_s=0.008, duration_s=0.010)
    launches = kernel_trace.kernel_launches(trace)
    assert kernel_trace.clock_offset_us(trace) == pytest.approx(offset)
    (row,) = kernel_trace.attribute([step], launches, kernel_trace.clock_offset_us(trace))
    assert row["prepare_kernels_ms"] == {"fill": 0.1}
    assert row["step_kernels_ms"] == {"attention": 2.0, "gemm": 0.5}
    assert row["update_kernels_ms"] == {"copy": 0.03}
    top = row["top_step_kernels"]
    assert top["aten::_cudnn_attention_forward | cudnn_generated_fort_native_sdpa_sm90_flash_fprop"] == [2.0, 1]
    assert next(iter(top)).startswith("aten::_cudnn_attention_forward")


def test_a_profile_without_the_clock_mark_is_refused():
    with pytest.raises(RuntimeError, match="clock mark"):
        kernel_trace.clock_offset_us({"traceEvents": []})

"""Every engine setting is modelled by the simulator or refused (issue #24): the registry in
`dooly.sim.engine_settings`, and `simulate`, `validate` and `explore` refusing with one line."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
from click.testing import CliRunner
from validate_support import MODEL, write_truth

from dooly.cli import cli
from dooly.errors import DoolyError
from dooly.sim.engine_settings import REGISTRY, check_modelled
from dooly.sim.schedulers import TransformersCBConfig, VllmConfig

# (engine, setting) pairs the simulator does not model: vLLM async scheduling on (transformers'
# async batching is modelled), and a setting the engine takes that the simulator has no model of.
UNMODELLED = [
    ("transformers", "allow_block_sharing=true", "allow_block_sharing=true is not modelled"),
    ("transformers", "bogus=1", "unknown key 'bogus'"),
    ("vllm", "async_scheduling=true", "async_scheduling=true is not modelled"),
    ("vllm", "enable_prefix_caching=true", "enable_prefix_caching=true is not modelled"),
]


def _run(*args: str):
    return CliRunner().invoke(cli, list(args))


def _one_error_line(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert "the simulator models" in lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize("engine, config_class", [("transformers", TransformersCBConfig), ("vllm", VllmConfig)])
def test_the_modelled_settings_are_exactly_the_scheduler_models_fields(engine, config_class):
    registry = REGISTRY[engine]
    assert {s.name for s in registry.modelled} == {f.name for f in fields(config_class)}
    assert not {s.name for s in registry.modelled} & {s.name for s in registry.not_modelled}
    assert all(s.how for s in registry.modelled) and all(s.gap and not s.how for s in registry.not_modelled)


def test_transformers_async_batching_is_modelled_and_vllm_async_scheduling_is_not():
    for value in (False, True):
        check_modelled("transformers", {"use_async_batching": value, "use_cuda_graph": [True, True]}, "test")
    check_modelled("vllm", {"async_scheduling": False, "max_num_seqs": 8}, "test")
    with pytest.raises(DoolyError, match="async_scheduling=true is not modelled"):
        check_modelled("vllm", {"async_scheduling": True}, "test")


@pytest.mark.parametrize("engine, setting, message", UNMODELLED)
def test_simulate_refuses_an_unmodelled_setting(tmp_path, engine, setting, message):
    out = tmp_path / "out"
    result = _run("simulate", MODEL, "--analytic", "--engine", engine, "--requests", "5", "--set", setting, "--out", str(out))
    _one_error_line(result, message)
    assert result.stderr.startswith("error: --set: ")
    assert not out.exists()


def test_simulate_refuses_an_unmodelled_setting_in_an_engine_config(tmp_path):
    config = tmp_path / "engine.json"
    config.write_text(json.dumps({"num_blocks": 64, "allow_block_sharing": True}))
    out = tmp_path / "out"
    result = _run("simulate", MODEL, "--analytic", "--requests", "5", "--engine-config", str(config), "--out", str(out))
    _one_error_line(result, f"--engine-config {config}: transformers setting allow_block_sharing=true is not modelled")
    assert not out.exists()


@pytest.mark.parametrize("engine, setting, message", UNMODELLED)
def test_validate_refuses_an_unmodelled_setting(tmp_path, engine, setting, message):
    truth = write_truth(tmp_path / "truth", engine=engine)
    plot = tmp_path / "scatter.png"
    result = _run("validate", MODEL, "--ground-truth", str(truth), "--analytic", "--engine", engine, "--set", setting,
                  "--plot", str(plot))
    _one_error_line(result, message)
    assert not plot.exists()


def test_validate_refuses_a_ground_truth_recorded_with_an_unmodelled_setting(tmp_path):
    truth = write_truth(tmp_path / "truth", engine="vllm", settings={"num_gpu_blocks": 512, "async_scheduling": True})
    plot = tmp_path / "scatter.png"
    result = _run("validate", MODEL, "--ground-truth", str(truth), "--analytic", "--engine", "vllm", "--plot", str(plot))
    _one_error_line(result, f"ground truth {truth / 'engine.json'}: vllm setting async_scheduling=true is not modelled")
    assert not plot.exists()
    # Overriding the recorded setting does not make the measurement synchronous: still refused.
    overridden = _run("validate", MODEL, "--ground-truth", str(truth), "--analytic", "--engine", "vllm",
                      "--set", "async_scheduling=false")
    _one_error_line(overridden, "async_scheduling=true is not modelled")
    # A repeat recorded with it is refused too.
    first = write_truth(tmp_path / "first", engine="vllm", settings={"num_gpu_blocks": 512})
    repeat = _run("validate", MODEL, "--ground-truth", str(first), "--ground-truth", str(truth), "--analytic",
                  "--engine", "vllm")
    _one_error_line(repeat, "async_scheduling=true is not modelled")


def test_validate_accepts_a_ground_truth_recorded_synchronously(tmp_path):
    truth = write_truth(tmp_path / "truth", settings={"num_blocks": 512, "use_async_batching": False})
    result = _run("validate", MODEL, "--ground-truth", str(truth), "--analytic", "--output", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["simulation"]["settings"]["use_async_batching"] is False


def test_vllm_on_a_cpu_backend_starts_from_no_cuda_graphs_and_a_user_setting_wins():
    from dooly.engines.vllm_engine import CPU_BACKEND, CUDA_BACKENDS
    from dooly.explore.candidates import Candidate
    from dooly.sim.engine_settings import VLLM_CPU_BACKENDS, platform_defaults

    assert VLLM_CPU_BACKENDS == (CPU_BACKEND,)
    assert platform_defaults("vllm", CPU_BACKEND) == {"cudagraph_mode": "none"}
    assert all(platform_defaults("vllm", b) == {} for b in CUDA_BACKENDS)
    assert platform_defaults("transformers", CPU_BACKEND) == {} and platform_defaults("vllm", None) == {}
    candidate = Candidate("m", "AMD-EPYC", "vllm", CPU_BACKEND, "float32", 1, json.dumps({"max_num_seqs": 4}))
    assert candidate.settings == {"cudagraph_mode": "none", "max_num_seqs": 4}
    assert Candidate("m", "AMD-EPYC", "vllm", CPU_BACKEND, "float32", 1,
                     json.dumps({"cudagraph_mode": "full"})).settings == {"cudagraph_mode": "full"}


def test_simulate_keys_a_cpu_vllm_run_as_graphs_off(tmp_path):
    """The committed CPU vLLM store holds no store calibration: the refusal names the key simulate
    looked for, which must be the eager path the CPU build runs (graphs on was asked of it before)."""
    from pathlib import Path

    store = Path(__file__).resolve().parents[2] / "data" / "cpu-vllm" / "store"
    result = CliRunner().invoke(cli, ["simulate", "Qwen/Qwen2.5-0.5B", "--store", str(store), "--engine", "vllm",
                                      "--platform", "AMD-EPYC", "--backend", "CPU_ATTN", "--dtype", "float32",
                                      "--requests", "2"])
    assert result.exit_code == 2
    assert "AMD-EPYC / vllm / CPU_ATTN / graphs off" in result.output, result.output

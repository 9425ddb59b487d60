"""The fleet file: the bundled default loads, and every mistake is one line naming file and line."""

from __future__ import annotations

from importlib import resources

import pytest
import yaml
from click.testing import CliRunner
from fleet_support import SMALL_FLEET

from dooly.cli import cli
from dooly.errors import DoolyError
from dooly.fleet import jobs
from dooly.fleet.spec import KNOWN_BACKENDS, FleetSpec
from dooly.models.registry import bundled_model_ids


def test_default_fleet_loads_with_a_job_per_gpu_engine_backend():
    spec = FleetSpec.load(None)
    raw = yaml.safe_load(resources.files("dooly.fleet").joinpath("default_fleet.yaml").read_text())
    expected = sum(len(g["backends"]) for g in raw["gpuTypes"]) * len(raw["engines"])
    assert len(spec.targets()) == expected
    assert {g.product for g in spec.gpu_types} == {g["product"] for g in raw["gpuTypes"]}
    assert set(spec.models) <= set(bundled_model_ids())
    assert spec.store.startswith("s3://")


def test_known_transformers_backends_match_the_engine_adapter():
    from dooly.engines import transformers_cb

    assert set(KNOWN_BACKENDS["transformers"]) == set(transformers_cb.all_backends())


def _load(tmp_path, text: str) -> FleetSpec:
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    return FleetSpec.load(path)


def _line_of(text: str, needle: str) -> int:
    """The line of the last occurrence of `needle` (a duplicate is reported where it repeats)."""
    return max(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.mark.parametrize(
    ("old", "new", "needle", "message"),
    [
        ("backends: [paged|sdpa]", "backends: [paged|flash]", "paged|flash", "unknown backend 'paged|flash'"),
        ("  - mistralai/Mistral-7B-v0.3", "  - acme/NoSuchModel-9B", "NoSuchModel", "unknown model"),
        ("    completions: 2\n", "    completion: 2\n", "completion: 2", "unknown field"),
        ("profiler:1.2.3", "profiler:latest", "profiler:latest", "floating tag 'latest'"),
        ("controller:1.2.3", "controller", "controller: controller", "no tag or digest"),
        ("product: NVIDIA-L40S", "product: NVIDIA L40S!", "NVIDIA L40S!", "not a valid node label value"),
        ("    parallelism: 2\n", "    parallelism: 9\n", "parallelism: 9", "out of range"),
        ("namespace: dooly", "namespace: Dooly_NS", "Dooly_NS", "not a DNS-1123 label"),
        ("store: s3://dooly-test/db", "store: http://example.com/db", "http://example.com", "only s3://"),
        ("  - name: l40s", "  - name: h100", "name: h100", "listed twice"),
        ("    gpus: 2\n", "    gpus: two\n", "gpus: two", "expected an integer"),
        ("    product: NVIDIA-L40S\n", "", "name: l40s", "needs its `product` label value"),
        ("  maxTokens: 512", "  maxTokens: 0", "maxTokens: 0", "out of range"),
        ("  dtype: float16", "  dtype: int4", "dtype: int4", "'int4' is not one of"),
        ("  samples: 7", "  sample: 7", "sample: 7", "unknown field"),
    ],
)
def test_fleet_errors_name_the_file_and_line(tmp_path, old, new, needle, message):
    assert old in SMALL_FLEET
    text = SMALL_FLEET.replace(old, new, 1)
    with pytest.raises(DoolyError) as info:
        _load(tmp_path, text)
    error = str(info.value)
    assert message in error
    assert "\n" not in error
    assert f"fleet.yaml, line {_line_of(text, needle)}:" in error


def test_resources_quantity_is_checked_with_its_line(tmp_path):
    text = SMALL_FLEET + "resources:\n  merge: {cpu: '2', memory: 8GB}\n"
    with pytest.raises(DoolyError, match=rf"line {_line_of(text, '8GB')}: resources.merge.memory: '8GB' is not"):
        _load(tmp_path, text)


def test_yaml_syntax_and_duplicate_keys_are_located(tmp_path):
    broken = SMALL_FLEET.replace("backends: [paged|sdpa]", "backends: [paged|sdpa")
    with pytest.raises(DoolyError, match=r"fleet.yaml, line \d+: not valid YAML"):
        _load(tmp_path, broken)
    duplicated = SMALL_FLEET + "namespace: other\n"
    with pytest.raises(DoolyError, match=rf"line {len(duplicated.splitlines())}: duplicate key 'namespace'"):
        _load(tmp_path, duplicated)
    with pytest.raises(DoolyError, match="empty"):
        _load(tmp_path, "# nothing here\n")
    with pytest.raises(DoolyError, match="cannot read fleet file"):
        FleetSpec.load(tmp_path / "missing.yaml")


def test_select_narrows_and_refuses_unknown_names(small_fleet):
    spec = FleetSpec.load(small_fleet)
    assert len(spec.targets()) == 3
    narrowed = spec.select(gpus=["h100"], backends=["paged|eager"])
    assert [(t.gpu.name, t.backend) for t in narrowed.targets()] == [("h100", "paged|eager")]
    assert spec.select(models=["Qwen/Qwen2.5-7B"]).models == ("Qwen/Qwen2.5-7B",)
    for kwargs, message in [
        ({"gpus": ["a100"]}, "unknown GPU type 'a100'"),
        ({"backends": ["sdpa"]}, "unknown backend 'sdpa'"),
        ({"engines": ["vllm"]}, "unknown engine 'vllm'"),
        ({"models": ["nobody/nothing"]}, "unknown model 'nobody/nothing'"),
        ({"gpus": ["l40s"], "backends": ["paged|eager"]}, "unknown backend"),
    ]:
        with pytest.raises(DoolyError, match=message):
            spec.select(**kwargs)


def test_vllm_engine_gets_its_own_image_and_backends(tmp_path):
    text = SMALL_FLEET.replace(
        "engines:\n  - name: transformers\n",
        "engines:\n  - name: transformers\n  - name: vllm\n    image: profiler:1.2.3-vllm\n",
    ).replace("backends: [paged|sdpa, paged|eager]", "backends: [paged|sdpa, paged|eager, FLASH_ATTN]")
    spec = _load(tmp_path, text)
    vllm = [t for t in spec.targets() if t.engine.name == "vllm"]
    assert [(t.gpu.name, t.backend) for t in vllm] == [("h100", "FLASH_ATTN")]
    assert vllm[0].engine.image == "registry.example.com/dooly/profiler:1.2.3-vllm"


def test_a_multi_gpu_pod_profiles_tensor_parallel_or_the_fleet_is_refused(tmp_path):
    spec = _load(tmp_path, SMALL_FLEET)
    l40s = next(t for t in spec.targets() if t.gpu.name == "l40s")
    args = _profile_args(jobs.build_profile_job(spec, l40s, run_id="20260101-000000"))
    assert args[args.index("--tp") + 1] == "2"
    h100 = next(t for t in spec.targets() if t.gpu.name == "h100")
    args = _profile_args(jobs.build_profile_job(spec, h100, run_id="20260101-000000"))
    assert "--tp" not in args

    vllm_on_two = SMALL_FLEET.replace(
        "engines:\n  - name: transformers\n",
        "engines:\n  - name: transformers\n  - name: vllm\n    image: profiler:1.2.3-vllm\n",
    ).replace("backends: [paged|sdpa]", "backends: [paged|sdpa, FLASH_ATTN]")
    with pytest.raises(DoolyError, match=r"gpuTypes\[1\]\.gpus: .*vllm engine .* traces tp=1 only") as info:
        _load(tmp_path, vllm_on_two)
    assert "\n" not in str(info.value)
    indivisible = SMALL_FLEET.replace("    gpus: 2\n", "    gpus: 3\n")
    with pytest.raises(DoolyError, match=r"--tp 3, which does not divide meta-llama/Llama-3.1-8B's num_attention_heads=32"):
        _load(tmp_path, indivisible)


def _profile_args(job: dict) -> list[str]:
    """The `dooly profile` container's arguments (GPU pods profile in an init container, before the
    calibration run)."""
    pod = job["spec"]["template"]["spec"]
    containers = pod.get("initContainers", []) + pod["containers"]
    return next(c["args"] for c in containers if c["name"] == "profile")


@pytest.mark.parametrize(
    "args",
    [
        ["fleet", "render", "--gpu", "b200"],
        ["fleet", "render", "--backend", "paged|nope"],
        ["fleet", "render", "--model", "acme/unknown"],
        ["fleet", "submit", "--executor", "kubernetes", "--engine", "sglang"],
    ],
)
def test_cli_bad_selection_is_one_line_exit_2(args):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: unknown ")


def test_cli_bad_fleet_file_is_one_line_with_its_line_number(tmp_path):
    text = SMALL_FLEET.replace("paged|eager]", "paged|eagre]")
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    result = CliRunner().invoke(cli, ["fleet", "render", "--fleet", str(path)])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: {path}, line {_line_of(text, 'eagre')}: gpuTypes[0].backends[1]: unknown backend 'paged|eagre' "
        f"for engines transformers (known: {', '.join(sorted(KNOWN_BACKENDS['transformers']))})"
    )


def test_the_profile_section_takes_an_attention_grid_or_refuses_an_unknown_one(tmp_path):
    spec = _load(tmp_path, SMALL_FLEET.replace("profile:\n", "profile:\n  attentionGrid: thin-mixed\n"))
    h100 = next(t for t in spec.targets() if t.gpu.name == "h100")
    args = _profile_args(jobs.build_profile_job(spec, h100, run_id="20260101-000000"))
    assert args[args.index("--attention-grid") + 1] == "thin-mixed"
    full = _load(tmp_path, SMALL_FLEET)
    full_h100 = next(t for t in full.targets() if t.gpu.name == "h100")
    assert "--attention-grid" not in _profile_args(jobs.build_profile_job(full, full_h100, run_id="20260101-000000"))
    with pytest.raises(DoolyError, match=r"profile\.attentionGrid: 'sparse' is not one of full, thin-all, thin-mixed"):
        _load(tmp_path, SMALL_FLEET.replace("profile:\n", "profile:\n  attentionGrid: sparse\n"))


@pytest.mark.parametrize(("field", "flag", "noun", "values"), [
    ("tokenBudgets", "--token-budget", "token budgets", ["8192", "4096"]),
    ("contexts", "--context", "context lengths", ["16384", "32768"]),
])
def test_the_profile_section_takes_a_list_of_sizes_or_refuses_bad_ones(tmp_path, field, flag, noun, values):
    """Each listed size becomes one flag of the profiling Job, in the order given."""
    spec = _load(tmp_path, SMALL_FLEET.replace("profile:\n", f"profile:\n  {field}: [{', '.join(values)}]\n"))
    h100 = next(t for t in spec.targets() if t.gpu.name == "h100")
    args = _profile_args(jobs.build_profile_job(spec, h100, run_id="20260101-000000"))
    assert [args[i + 1] for i, arg in enumerate(args) if arg == flag] == values
    for bad, message in (("[]", f"expected a non-empty list of {noun}"), ("[0]", rf"{field}\[0\]: 0 is out of range"),
                         ("[512, 512]", rf"{field}\[1\]: 512 is listed twice"), ("8192", "expected a non-empty list")):
        with pytest.raises(DoolyError, match=message):
            _load(tmp_path, SMALL_FLEET.replace("profile:\n", f"profile:\n  {field}: {bad}\n"))

"""Every manifest dooly emits validates against the official Kubernetes schemas of each supported
version, passes our own checks for what those schemas let through, and means what we intend."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner
from fleet_support import REPO, validate_schema
from kubernetes import client
from kubernetes_validate.utils import all_versions
from packaging.version import Version

from dooly.cli import cli
from dooly.fleet import checks, jobs
from dooly.fleet.spec import DEMO_FLEET_RESOURCE, FleetSpec

OLDEST_SUPPORTED = Version("1.29")
VERSIONS = [v for v in all_versions() if Version(v) >= OLDEST_SUPPORTED]
RUN_ID = "20250101-020000"
K8S_DIR = REPO / "k8s"


def _fleets(small_fleet: Path) -> dict[str, FleetSpec]:
    small = small_fleet.read_text().replace(
        "engines:\n  - name: transformers\n",
        "engines:\n  - name: transformers\n  - name: vllm\n    image: profiler:1.2.3-vllm\n",
    ).replace("backends: [paged|sdpa, paged|eager]", "backends: [paged|sdpa, paged|eager, FLASH_ATTN]")
    small_fleet.write_text(small)
    return {
        "default": FleetSpec.load(None),
        "small": FleetSpec.load(small_fleet),
        "demo": FleetSpec.bundled(DEMO_FLEET_RESOURCE),
    }


def _everything(spec: FleetSpec) -> list[dict]:
    manifests = [*jobs.build_run_manifests(spec, run_id=RUN_ID), *jobs.build_setup_manifests(spec)]
    manifests.append(jobs.build_merge_job(spec, run_id=RUN_ID, suspend=False))
    manifests += [
        jobs.build_simulate_job(spec, run_id=RUN_ID, model=model, engine=t.engine.name, backend=t.backend,
                                platform=t.gpu.product or "auto")
        for model in spec.models
        for t in spec.targets()
    ]
    return manifests


def _k8s_files() -> list[dict]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return docs


def _validate_all_versions(manifests: list[dict]) -> None:
    for version in VERSIONS:
        for manifest in manifests:
            validate_schema(manifest, version)


def test_supported_versions_cover_1_29_to_the_newest_shipped():
    assert Version(VERSIONS[0]) == OLDEST_SUPPORTED
    assert Version(VERSIONS[-1]) >= Version("1.37")


def test_cached_schema_validation_agrees_with_kubernetes_validate(small_fleet):
    job = jobs.build_profile_jobs(FleetSpec.load(small_fleet), run_id=RUN_ID)[0]
    bad = copy.deepcopy(job)
    bad["spec"]["completions"] = "three"
    for version in (VERSIONS[0], VERSIONS[-1]):
        validate_schema(job, version)
        kubernetes_validate.validate(job, version, strict=True)
        with pytest.raises(jsonschema.ValidationError):
            validate_schema(bad, version)
        with pytest.raises(jsonschema.ValidationError):
            kubernetes_validate.validate(bad, version, strict=True)


def _one_of_each_shape(manifests: list[dict]) -> list[dict]:
    """Manifests from one builder differ only in values: one per (kind, component, engine, suspend)."""
    shapes: dict[tuple, dict] = {}
    for m in manifests:
        labels = m["metadata"].get("labels", {})
        key = (m["kind"], labels.get(jobs.COMPONENT_LABEL), labels.get(jobs.ENGINE_LABEL), str(m.get("spec", {}).get("suspend")))
        shapes.setdefault(key, m)
    return list(shapes.values())


def test_rendered_manifests_validate_against_every_supported_schema(small_fleet):
    fleets = _fleets(small_fleet)
    default = fleets.pop("default")
    rendered = [*jobs.build_run_manifests(default, run_id=RUN_ID), *jobs.build_setup_manifests(default)]
    _validate_all_versions(rendered)
    for name, spec in {"default": default, **fleets}.items():
        manifests = _everything(spec)
        _validate_all_versions(_one_of_each_shape(manifests))
        assert checks.check_manifests(manifests) == [], name


def test_k8s_folder_validates_and_matches_what_render_setup_emits():
    files = _k8s_files()
    assert {d["kind"] for d in files} == {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"}
    _validate_all_versions(files)
    assert checks.check_manifests(files) == []
    assert files == jobs.build_setup_manifests(FleetSpec.load(None))
    # kubectl apply -f k8s/ goes in file-name order: the namespace must come first.
    first = yaml.safe_load(min(K8S_DIR.glob("*.yaml")).read_text())
    assert first["kind"] == "Namespace"


def test_k8s_rbac_is_namespaced_and_least_privilege():
    files = _k8s_files()
    role = next(d for d in files if d["kind"] == "Role")
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert {(g, r) for g, r, _ in granted} == {("batch", "jobs"), ("", "pods"), ("", "pods/log")}
    assert not any(v in ("*", "escalate", "bind", "impersonate") for _, _, v in granted)
    assert ("", "pods/log", "get") in granted and ("batch", "jobs", "create") in granted
    assert not any(d["kind"].startswith("Cluster") for d in files)
    cron = next(d for d in files if d["kind"] == "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == next(s["name"] for s in next(d for d in files if d["kind"] == "RoleBinding")["subjects"])
    args = pod["containers"][0]["args"]
    assert args[:2] == ["fleet", "submit"] and "--wait" in args and args[args.index("--executor") + 1] == "kubernetes"
    configmap = next(d for d in files if d["kind"] == "ConfigMap")
    mounted = args[args.index("--fleet") + 1]
    assert Path(mounted).name in configmap["data"]
    assert FleetSpec.from_text(configmap["data"][Path(mounted).name], source="configmap").namespace == "dooly"


def test_profile_jobs_split_work_by_completion_index(small_fleet):
    spec = _fleets(small_fleet)["small"]
    profile_jobs = jobs.build_profile_jobs(spec, run_id=RUN_ID)
    targets = spec.targets()
    assert len(profile_jobs) == len(targets)
    names = [j["metadata"]["name"] for j in profile_jobs]
    assert len(set(names)) == len(names) and all(len(n) <= 63 for n in names)
    for job, target in zip(profile_jobs, targets):
        job_spec = job["spec"]
        pod = job_spec["template"]["spec"]
        container = next(c for c in pod.get("initContainers", []) + pod["containers"] if c["name"] == "profile")
        args = container["args"]
        assert job_spec["completionMode"] == "Indexed"
        assert job_spec["completions"] == target.gpu.completions
        assert job_spec["parallelism"] == target.gpu.parallelism
        assert args[0] == "profile" and list(args[1 : 1 + len(spec.models)]) == list(spec.models)
        assert args[args.index("--shard-count") + 1] == str(target.gpu.completions)
        assert args[args.index("--shard-index") + 1] == "$(JOB_COMPLETION_INDEX)"
        assert args[args.index("--attention") + 1] == target.backend
        assert args[args.index("--engine") + 1] == target.engine.name
        assert args[args.index("--store") + 1] == spec.store
        assert args[args.index("--platform") + 1] == "auto"
        assert args[args.index("--max-tokens") + 1] == "512" and args[args.index("--samples") + 1] == "7"
        assert args[args.index("--dtype") + 1] == "float16"
        assert args[args.index("--run-id") + 1] == f"{job['metadata']['name']}-$(JOB_COMPLETION_INDEX)"
        index_env = next(e for e in container["env"] if e["name"] == "JOB_COMPLETION_INDEX")
        assert "job-completion-index" in index_env["valueFrom"]["fieldRef"]["fieldPath"]
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": target.gpu.product}
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"] == str(target.gpu.gpus)
        assert any(t.get("key") == "nvidia.com/gpu" for t in pod["tolerations"])
        assert container["image"] == target.engine.image
        assert job_spec["backoffLimitPerIndex"] == spec.retries_per_index
        assert job_spec["activeDeadlineSeconds"] == spec.profile_deadline_s
        assert job_spec["ttlSecondsAfterFinished"] == spec.ttl_after_finished_s
        actions = {r["action"] for r in job_spec["podFailurePolicy"]["rules"]}
        assert {"FailJob", "Ignore"} <= actions
        assert pod["restartPolicy"] == "Never"


def test_pods_are_non_root_read_only_and_take_credentials_from_the_secret(small_fleet):
    spec = _fleets(small_fleet)["small"]
    for job in jobs.build_run_manifests(spec, run_id=RUN_ID):
        pod = job["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
        assert pod["automountServiceAccountToken"] is False
        writable = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for container in pod.get("initContainers", []) + pod["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts["/tmp"] in writable
            by_name = {e["name"]: e for e in container["env"]}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
                assert "value" not in by_name[key]
                assert by_name[key]["valueFrom"]["secretKeyRef"]["name"] == spec.s3_secret


def test_merge_job_is_suspended_and_fits_after_merging(small_fleet):
    spec = FleetSpec.load(small_fleet)
    merge = jobs.build_run_manifests(spec, run_id=RUN_ID)[-1]
    pod = merge["spec"]["template"]["spec"]
    assert merge["spec"]["suspend"] is True
    # A fleet with GPU pools fits the host-overhead calibration last, on the fitted kernels.
    assert [c["args"][0] for c in pod["initContainers"]] == ["merge", "fit"]
    assert [c["args"][0] for c in pod["containers"]] == ["calibrate"]
    assert "--from-store" in pod["containers"][0]["args"]
    for container in pod["initContainers"] + pod["containers"]:
        assert container["args"][container["args"].index("--store") + 1] == spec.store
        assert container["image"] == spec.controller_image
    assert "nodeSelector" not in pod
    assert all("nvidia.com/gpu" not in c["resources"]["limits"] for c in pod["containers"])


def test_the_client_models_carry_every_field_we_set(small_fleet):
    api = client.ApiClient()
    for manifest in jobs.build_run_manifests(FleetSpec.load(small_fleet), run_id=RUN_ID):
        assert api.sanitize_for_serialization(client.V1Job.from_dict(manifest)) == manifest
    cron = jobs.build_cronjob(FleetSpec.load(None))
    assert api.sanitize_for_serialization(client.V1CronJob.from_dict(cron)) == cron


def _mutated(manifest: dict, mutate) -> dict:
    copied = copy.deepcopy(manifest)
    mutate(copied)
    return copied


def _pod(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        (lambda j: j["metadata"].update(name="Profile_H100"), "not a DNS-1123 name"),
        (lambda j: j["metadata"].update(name="x" * 64), "at most 63"),
        (lambda j: _pod(j).update(restartPolicy="Always"), "restartPolicy"),
        (lambda j: _pod(j)["containers"][0]["resources"]["limits"].update(memory="8GB"), "not a Kubernetes quantity"),
        (lambda j: j["spec"]["podFailurePolicy"]["rules"][0].update(action="Retry"), "'Retry' is not one of"),
        (lambda j: j["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"].update(values=[0, 2]), "cannot match exit code 0"),
        (lambda j: j["spec"].update(completionMode="Sharded"), "completionMode"),
        (lambda j: j["spec"].update(parallelism=99), "exceeds completions"),
        (lambda j: _pod(j)["containers"][0].update(image="ghcr.io/x/profiler:latest"), "floating tag"),
        (lambda j: _pod(j)["containers"][0].update(image="ghcr.io/x/profiler"), "no tag or digest"),
        (lambda j: j["metadata"]["labels"].update({"dooly.dev/backend": "paged|sdpa"}), "not a valid label value"),
        (lambda j: _pod(j)["containers"][0]["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"}), "never inline"),
        (lambda j: _pod(j)["securityContext"].update(runAsNonRoot=False), "non-root"),
        (lambda j: _pod(j)["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True), "allowPrivilegeEscalation"),
        (lambda j: _pod(j)["tolerations"][0].update(operator="Maybe"), "'Maybe' is not one of"),
        (lambda j: _pod(j)["containers"][0]["volumeMounts"].append({"name": "ghost", "mountPath": "/x"}), "not declared"),
        (lambda j: _pod(j)["containers"][0]["resources"]["requests"].update({"nvidia.com/gpu": "2"}), "requests equal to limits"),
    ],
)
def test_our_checks_catch_what_the_schema_lets_through(small_fleet, mutate, problem):
    job = jobs.build_profile_jobs(FleetSpec.load(small_fleet), run_id=RUN_ID)[0]
    bad = _mutated(job, mutate)
    kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)
    problems = checks.check_manifests([bad])
    assert any(problem in p for p in problems), problems


@pytest.mark.parametrize(
    ("kind", "mutate", "problem"),
    [
        ("CronJob", lambda c: c["spec"].update(concurrencyPolicy="Sometimes"), "concurrencyPolicy"),
        ("CronJob", lambda c: c["spec"].update(schedule="every night"), "cron expression"),
        ("CronJob", lambda c: c["metadata"].update(name="n" * 53), "at most 52"),
        ("Role", lambda r: r["rules"][0].update(verbs=["*"]), "wildcards"),
        ("Role", lambda r: r["rules"].append({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}), "more than dooly needs"),
        ("RoleBinding", lambda b: b["roleRef"].update(kind="ClusterRole"), "namespaced Role"),
        ("Namespace", lambda n: n["metadata"].update(name="Dooly"), "not a DNS-1123 name"),
    ],
)
def test_our_checks_catch_bad_setup_objects(kind, mutate, problem):
    original = next(m for m in jobs.build_setup_manifests(FleetSpec.load(None)) if m["kind"] == kind)
    bad = _mutated(original, mutate)
    kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)
    assert any(problem in p for p in checks.check_manifests([bad]))


def test_long_job_names_stay_unique_and_valid():
    long_a = jobs.job_name("dooly", RUN_ID, "a-very-long-gpu-type", "transformers", "paged|flex_attention_a")
    long_b = jobs.job_name("dooly", RUN_ID, "a-very-long-gpu-type", "transformers", "paged|flex_attention_b")
    assert long_a != long_b
    assert all(len(n) <= 63 and checks.is_dns1123_label(n) for n in (long_a, long_b))


def test_render_prints_what_submit_creates(small_fleet):
    result = CliRunner().invoke(cli, ["fleet", "render", "--fleet", str(small_fleet), "--run-id", RUN_ID])
    assert result.exit_code == 0, result.stderr
    docs = list(yaml.safe_load_all(result.stdout))
    assert docs == jobs.build_run_manifests(FleetSpec.load(small_fleet), run_id=RUN_ID)
    assert "&id" not in result.stdout, "shared objects must not turn into YAML anchors"
    as_json = CliRunner().invoke(
        cli, ["fleet", "render", "--fleet", str(small_fleet), "--run-id", RUN_ID, "--output", "json"]
    )
    assert json.loads(as_json.stdout)["items"] == docs
    setup = CliRunner().invoke(cli, ["fleet", "render", "--setup"])
    assert list(yaml.safe_load_all(setup.stdout)) == _k8s_files()


def test_render_refuses_a_local_store_for_the_cluster(small_fleet, tmp_path):
    result = CliRunner().invoke(cli, ["fleet", "render", "--fleet", str(small_fleet), "--store", str(tmp_path)])
    assert result.exit_code == 2
    assert "s3:// store" in result.stderr and result.stdout == ""


def test_gpu_profiling_pods_record_a_calibration_run_after_profiling(small_fleet):
    """Profile, then `dooly bench` on the calibration workload on the same GPU, then record the run."""
    from dooly.workload import WorkloadSpec, spec_from_options

    spec = _fleets(small_fleet)["small"]
    for job in jobs.build_profile_jobs(spec, run_id=RUN_ID):
        pod = job["spec"]["template"]["spec"]
        assert [c["name"] for c in pod["initContainers"]] == ["profile", "calibration-bench"]
        [record] = pod["containers"]
        bench = pod["initContainers"][1]["args"]
        run_dir = f"$({jobs.CALIBRATION_DIR_ENV})"
        assert bench[0] == "bench" and bench[bench.index("--out") + 1] == run_dir
        assert record["args"][:1] == ["calibrate"] and "--record-only" in record["args"]
        assert record["args"][record["args"].index("--ground-truth") + 1] == run_dir
        for container in (pod["initContainers"][1], record):
            assert {"name": jobs.CALIBRATION_DIR_ENV, "value": jobs.CALIBRATION_DIR} in container["env"]
        assert "nvidia.com/gpu" in pod["initContainers"][1]["resources"]["limits"]
    # The flags are the committed calibration workload, not a look-alike.
    committed = WorkloadSpec.load(Path(__file__).resolve().parents[2] / "device" / "workloads" / "calib.json")
    options = dict(zip(jobs.CALIBRATION_WORKLOAD_ARGS[::2], jobs.CALIBRATION_WORKLOAD_ARGS[1::2], strict=True))
    flagged = spec_from_options(requests=int(options["--requests"]), rate=float(options["--rate"]),
                                arrival=options["--arrival"], prompt_len=options["--prompt-len"],
                                output_len=options["--output-len"], seed=int(options["--seed"]))
    assert flagged.to_dict() == committed.to_dict()


ROTATION_MODELS = ("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.1-8B")


def _calibration_bench(job: dict, index: int, out: Path) -> tuple[str, list[str]]:
    """The model the calibration bench of pod `index` serves, and its args: the rendered args with
    the pod's completion index expanded as the kubelet does, parsed by the real `dooly bench`."""
    from dooly.engines.commands import bench_command, choose_model

    [bench] = [c for c in job["spec"]["template"]["spec"]["initContainers"] if c["name"] == "calibration-bench"]
    values = {jobs.COMPLETION_INDEX_ENV: str(index), jobs.CALIBRATION_DIR_ENV: str(out)}
    args = list(bench["args"])
    for name, value in values.items():
        args = [arg.replace(f"$({name})", value) for arg in args]
    assert args[0] == "bench"
    with bench_command.make_context("bench", args[1:]) as ctx:
        return choose_model(ctx.params["models"], ctx.params["model_index"]), args


def test_calibration_runs_rotate_over_the_fleet_models_by_shard_index(small_fleet, tmp_path):
    """Shard i of a target benches models[i % len(models)]: 3 models on 4 shards give 0, 1, 2, 0
    (a calibration's per-layer terms need runs of several layer counts); one model is every shard's."""
    small_fleet.write_text(small_fleet.read_text().replace("completions: 3", "completions: 4"))
    spec = FleetSpec.load(small_fleet).select(gpus=["h100"], backends=["paged|sdpa"], models=ROTATION_MODELS)
    [job] = jobs.build_profile_jobs(spec, run_id=RUN_ID)
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 4
    _validate_all_versions([job])
    assert checks.check_manifests([job]) == []
    served = [_calibration_bench(job, index, tmp_path / "calib")[0] for index in range(4)]
    assert served == [ROTATION_MODELS[0], ROTATION_MODELS[1], ROTATION_MODELS[2], ROTATION_MODELS[0]]

    single = FleetSpec.load(small_fleet).select(gpus=["h100"], backends=["paged|sdpa"], models=ROTATION_MODELS[:1])
    [job] = jobs.build_profile_jobs(single, run_id=RUN_ID)
    for index in range(4):
        model, args = _calibration_bench(job, index, tmp_path / "calib")
        assert model == ROTATION_MODELS[0]
        assert args[:2] == ["bench", ROTATION_MODELS[0]] and "--model-index" not in args

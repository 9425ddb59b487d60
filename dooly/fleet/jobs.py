"""Builders of every Kubernetes object dooly runs: profiling Jobs, the merge Job, the CronJob, RBAC.

They return plain dicts (the shape `kubectl apply` reads), so `dooly fleet render` prints exactly what
`dooly fleet submit` creates and the local executor runs exactly what a kubelet would. The pods run
the same `dooly` commands a user runs by hand; the fleet layer only decides where they run.

    spec = FleetSpec.load(None)
    jobs = build_profile_jobs(spec, run_id="20250101-020000")   # one Indexed Job per target
    merge = build_merge_job(spec, run_id="20250101-020000")      # created suspended; resumed by `wait`
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import re
from typing import Any

import yaml

from dooly.errors import EXIT_BAD_INPUT, EXIT_SHRINK_REFUSED, EXIT_TRANSIENT, DoolyError
from dooly.fleet import checks
from dooly.fleet.spec import FleetSpec, ProfileTarget
from dooly.store.backends import CONNECT_DEADLINE_ENV, RETRY_DEADLINE_ENV

APP_NAME = "dooly"
LABEL_PREFIX = "dooly.dev"
RUN_LABEL = f"{LABEL_PREFIX}/run-id"
GPU_TYPE_LABEL = f"{LABEL_PREFIX}/gpu-type"
ENGINE_LABEL = f"{LABEL_PREFIX}/engine"
BACKEND_LABEL = f"{LABEL_PREFIX}/backend"
BACKEND_ANNOTATION = f"{LABEL_PREFIX}/attention-backend"
STORE_ANNOTATION = f"{LABEL_PREFIX}/store"
COMPONENT_LABEL = "app.kubernetes.io/component"
NAME_LABEL = "app.kubernetes.io/name"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
COMPONENT_PROFILE = "profile"
COMPONENT_MERGE = "merge"
MILLICPU = 1000
COMPONENT_SIMULATE = "simulate"
COMPONENT_CONTROLLER = "controller"

GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_RESOURCE = "nvidia.com/gpu"
COMPLETION_INDEX_ENV = "JOB_COMPLETION_INDEX"
COMPLETION_INDEX_FIELD = "metadata.annotations['batch.kubernetes.io/job-completion-index']"

WORKER_SERVICE_ACCOUNT = "dooly-worker"
CONTROLLER_SERVICE_ACCOUNT = "dooly-controller"
CONTROLLER_ROLE = "dooly-controller"
FLEET_CONFIGMAP = "dooly-fleet"
FLEET_CONFIGMAP_KEY = "fleet.yaml"
FLEET_MOUNT_DIR = "/etc/dooly"
CRONJOB_NAME = "dooly-nightly"

# The images create this user (images/*.Dockerfile); pods refuse to start as anyone else.
RUN_AS_UID = 10001
# Writable scratch on a read-only root filesystem: /tmp, the user's cache, and shared memory for GPUs.
TMP_DIR = "/tmp"
CACHE_DIR = "/home/dooly/.cache"
SHM_DIR = "/dev/shm"
TMP_SIZE = "8Gi"
CACHE_SIZE = "16Gi"
SHM_SIZE = "8Gi"
TERMINATION_GRACE_S = 30

# S3 settings a profiling or merge pod reads from the fleet's Secret (env name = Secret key).
S3_SECRET_KEYS_REQUIRED = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
S3_SECRET_KEYS_OPTIONAL = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")

# `dooly` exits with this code on bad input: retrying a pod cannot fix it, so it fails the whole Job.
USER_ERROR_EXIT_CODE = EXIT_BAD_INPUT
# `dooly merge` refuses to publish a generation smaller than the last one (lost or quarantined shards):
# a person must look, so the Job fails at once instead of retrying into the same refusal.
MERGE_SHRINK_EXIT_CODE = EXIT_SHRINK_REFUSED
# A store unreachable or throttled past the in-process retry deadline: the pod is retried (per index
# for profiling Jobs), counted against the retry budget, after Kubernetes' own pod backoff.
TRANSIENT_EXIT_CODE = EXIT_TRANSIENT
# How long a pod's S3 calls retry before exiting TRANSIENT_EXIT_CODE, and how long it waits for the
# store when it starts: together with the Job's retries and pod backoff (10 s doubling, capped at
# 6 min) an outage of several minutes is ridden out.
POD_S3_RETRY_DEADLINE_S = 600
POD_S3_CONNECT_DEADLINE_S = 300
# Without a terminal a profiling pod logs a progress line this often.
POD_PROGRESS_INTERVAL_S = 60
# The controller waits for the profiling and merge deadlines plus scheduling slack.
CONTROLLER_SLACK_S = 1800
CONTROLLER_HISTORY = 3
CONTROLLER_STARTING_DEADLINE_S = 3600

# The host-overhead calibration step of a GPU profiling pod (docs/calibration.md): after profiling,
# serve device/workloads/calib.json on the real engine with one of the fleet's models (shard i:
# models[i % len(models)]) and record the run in the store; the merge Job fits every recorded run
# of a platform once the kernels are fitted.
CALIBRATION_DIR = f"{TMP_DIR}/calib"
# The bench and record containers name the run's directory through this env variable, so that the
# local executor, which maps emptyDir mount paths in env values onto each pod's own scratch, keeps
# the run in the pod's /tmp: the shards running side by side never share (or record) one directory.
CALIBRATION_DIR_ENV = "DOOLY_CALIBRATION_DIR"
CALIBRATION_WORKLOAD_ARGS = (
    "--requests", "64", "--arrival", "poisson", "--rate", "12", "--seed", "3",
    "--prompt-len", "zipf:16:2048:0.6", "--output-len", "uniform:16:160",
)

RUN_ID_FORMAT = "%Y%m%d-%H%M%S"
_RUN_ID = re.compile(r"^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$")
NAME_HASH_CHARS = 8


def new_run_id(now: _dt.datetime | None = None) -> str:
    """A sortable run id from the UTC time: the latest run is the greatest id."""
    return (now or _dt.datetime.now(_dt.UTC)).strftime(RUN_ID_FORMAT)


def check_run_id(run_id: str) -> str:
    if not _RUN_ID.match(run_id):
        raise DoolyError(f"run id {run_id!r} must be 1-32 lowercase letters, digits or '-' (e.g. 20250101-020000)")
    return run_id


def job_name(*parts: str) -> str:
    """A DNS-1123 Job name from its parts; names over 63 characters keep a hash of the full name."""
    name = "-".join(checks.slug(p) for p in parts if p)
    if len(name) <= checks.DNS1123_LABEL_MAX:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:NAME_HASH_CHARS]
    return f"{name[: checks.DNS1123_LABEL_MAX - NAME_HASH_CHARS - 1].rstrip('-')}-{digest}"


def build_profile_jobs(spec: FleetSpec, *, run_id: str | None = None) -> list[dict]:
    """One Indexed Job per (GPU type, engine, backend) of the fleet."""
    run_id = check_run_id(run_id or new_run_id())
    return [build_profile_job(spec, target, run_id=run_id) for target in spec.targets()]


def build_profile_job(spec: FleetSpec, target: ProfileTarget, *, run_id: str) -> dict:
    """An Indexed Job whose pods each profile one deterministic shard of the missing signatures."""
    gpu, engine, backend = target.gpu, target.engine, target.backend
    labels = _labels(run_id, COMPONENT_PROFILE)
    labels.update({GPU_TYPE_LABEL: gpu.name, ENGINE_LABEL: engine.name, BACKEND_LABEL: checks.slug(backend)})
    name = job_name(APP_NAME, run_id, gpu.name, engine.name, backend)
    args = [
        "profile",
        *spec.models,
        "--store", spec.store,
        "--platform", "auto",
        # A GPU pod must not quietly measure its CPU when no GPU is visible (and a CPU pool never a GPU).
        "--device", "cuda" if gpu.gpus else "cpu",
        "--engine", engine.name,
        "--attention", backend,
        *_dtype_flag(spec),
        *spec.profile_flags,
        *(["--tp", str(gpu.gpus)] if gpu.gpus > 1 else []),
        "--shard-index", f"$({COMPLETION_INDEX_ENV})",
        "--shard-count", str(gpu.completions),
        # Rows and shard names say which Job and shard measured them.
        "--run-id", f"{name}-$({COMPLETION_INDEX_ENV})",
        "--output", "json",
    ]
    env: list[dict[str, Any]] = [
        {"name": COMPLETION_INDEX_ENV, "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX_FIELD}}},
        {"name": "TRITON_CACHE_DIR", "value": f"{CACHE_DIR}/triton"},
        {"name": "DOOLY_PROGRESS_INTERVAL_S", "value": str(POD_PROGRESS_INTERVAL_S)},
        *_s3_env(spec),
    ]
    limits: dict[str, str] = {"memory": gpu.resources.memory}
    requests: dict[str, str] = {"cpu": gpu.resources.cpu, "memory": gpu.resources.memory}
    if gpu.gpus:
        limits[GPU_RESOURCE] = requests[GPU_RESOURCE] = str(gpu.gpus)
    container = _container("profile", engine.image, args, env, requests, limits, shm=gpu.gpus > 0)
    if gpu.gpus:
        # Profile, then a calibration run of the engine on the same GPU, then record it.
        bench, record = _calibration_containers(spec, target, env, requests, limits)
        pod: dict[str, Any] = _pod_spec([record], init_containers=[container, bench], shm=True)
    else:
        pod = _pod_spec([container], init_containers=[], shm=False)
    if gpu.product:
        pod["nodeSelector"] = {GPU_PRODUCT_LABEL: gpu.product}
        pod["tolerations"] = [dict(t) for t in spec.tolerations + gpu.tolerations]
    annotations = {BACKEND_ANNOTATION: backend, STORE_ANNOTATION: spec.store}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(spec, name, labels, annotations),
        "spec": {
            "completionMode": "Indexed",
            "completions": gpu.completions,
            "parallelism": gpu.parallelism,
            "backoffLimitPerIndex": spec.retries_per_index,
            "podFailurePolicy": _pod_failure_policy(),
            "activeDeadlineSeconds": spec.profile_deadline_s,
            "ttlSecondsAfterFinished": spec.ttl_after_finished_s,
            "template": {"metadata": {"labels": dict(labels), "annotations": dict(annotations)}, "spec": pod},
        },
    }


def _calibration_containers(spec: FleetSpec, target: ProfileTarget, env: list[dict], requests: dict[str, str],
                            limits: dict[str, str]) -> tuple[dict, dict]:
    """`dooly bench` of one of the fleet's models on the calibration workload, and `dooly calibrate
    --record-only`, which copies the run into the store (no model is fitted yet at this point).

    Shard i benches models[i % len(models)] (`--model-index` takes the completion index): the runs
    of a target span several layer counts, which a calibration's per-layer terms and its capture
    cost line need, and models served on one lease agree (docs/calibration.md). The pods share one
    template, so the bench gets every model and picks its own; with one model the args name just it.
    Each run is stored content-addressed under calibration-runs/, so the shards' runs never collide.
    """
    rotation = ["--model-index", f"$({COMPLETION_INDEX_ENV})"] if len(spec.models) > 1 else []
    bench_args = [
        "bench", *spec.models,
        *rotation,
        "--store", spec.store,  # read only: the config of a model only the store knows
        "--engine", target.engine.name,
        "--attention", target.backend,
        "--device", "cuda",
        *_dtype_flag(spec),
        *CALIBRATION_WORKLOAD_ARGS,
        "--out", f"$({CALIBRATION_DIR_ENV})",
        "--output", "json",
    ]
    record_args = ["calibrate", "--store", spec.store, "--ground-truth", f"$({CALIBRATION_DIR_ENV})", "--record-only",
                   "--output", "json"]
    calib_env = [*env, {"name": CALIBRATION_DIR_ENV, "value": CALIBRATION_DIR}]
    bench = _container("calibration-bench", target.engine.image, bench_args, calib_env, requests, limits, shm=True)
    record = _container("calibration-record", target.engine.image, record_args, calib_env, requests, limits, shm=True)
    return bench, record


def build_merge_job(spec: FleetSpec, *, run_id: str | None = None, suspend: bool = False) -> dict:
    """The CPU Job that compacts the new shards (`dooly merge`), refits (`dooly fit`) and, for a
    fleet with GPU pools, fits the host-overhead calibration on every recorded calibration run
    (`dooly calibrate --from-store`).

    `merge` (and `fit`, when calibration follows) are init containers, so each step runs on the
    previous one's complete result. The controller creates the Job suspended with the profiling
    Jobs and resumes it once they have all finished.
    """
    run_id = check_run_id(run_id or new_run_id())
    labels = _labels(run_id, COMPONENT_MERGE)
    requests = {"cpu": spec.merge_resources.cpu, "memory": spec.merge_resources.memory}
    limits = {"memory": spec.merge_resources.memory}
    env = _s3_env(spec)
    merge = _container(
        "merge", spec.controller_image, ["merge", "--store", spec.store, "--output", "json"], env, requests, limits
    )
    fit = _container(
        "fit", spec.controller_image, ["fit", "--store", spec.store, "--output", "json"], env, requests, limits
    )
    # Containers of a pod run side by side and init containers one after the other: with
    # explorations, fit (and the calibration of GPU fleets) become init containers and each
    # exploration runs after them, on the generation just fitted; the last step is the pod's container.
    explore = [
        _container(f"explore-{e.name}", spec.controller_image, _explore_args(spec, e), env, requests, limits)
        for e in spec.explorations
    ]
    calibrate = []
    if any(target.gpu.gpus for target in spec.targets()):
        calibrate = [_container(
            "calibrate", spec.controller_image, ["calibrate", "--store", spec.store, "--from-store", "--output", "json"],
            env, requests, limits,
        )]
    steps = [merge, fit, *calibrate, *explore]
    annotations = {STORE_ANNOTATION: spec.store}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(spec, job_name(APP_NAME, run_id, COMPONENT_MERGE), labels, annotations),
        "spec": {
            "suspend": suspend,
            "completions": 1,
            "parallelism": 1,
            "backoffLimit": spec.merge_retries,
            "podFailurePolicy": _pod_failure_policy(),
            "activeDeadlineSeconds": spec.merge_deadline_s,
            "ttlSecondsAfterFinished": spec.ttl_after_finished_s,
            "template": {
                "metadata": {"labels": dict(labels), "annotations": dict(annotations)},
                "spec": _pod_spec(steps[-1:], init_containers=steps[:-1]),
            },
        },
    }


def _explore_args(spec: FleetSpec, exploration: Any) -> list[str]:
    """`dooly explore` of one configured exploration, its answer written to reports/gen-N/<name>/;
    as many worker processes as the merge pod requests CPUs."""
    return ["explore", *exploration.args, "--store", spec.store, "--report", "--report-name", exploration.name,
            "--jobs", str(_cpu_count(spec.merge_resources.cpu)), "--output", "json"]


def _cpu_count(quantity: str) -> int:
    """Whole CPUs of a Kubernetes CPU quantity ("2", "1.5", "500m"), at least one."""
    if quantity.endswith("m"):
        return max(int(quantity[:-1]) // MILLICPU, 1)
    return max(int(float(quantity)), 1)


def build_simulate_job(
    spec: FleetSpec,
    *,
    run_id: str,
    model: str,
    engine: str,
    backend: str,
    platform: str = "auto",
    workload_args: tuple[str, ...] = (),
    host_overhead: bool = True,
) -> dict:
    """A CPU Job that simulates serving one model on the fitted regressors of one platform and backend.

    `platform` names whose regressors to use: a GPU product label, or `auto` for the machine the
    Job runs on (the local demo, which profiled and simulates on the same CPU). With
    `host_overhead` the simulation adds the store's host-overhead calibration (and fails where the
    store has none); without, it adds none (`--no-cpu-overhead`: a CPU pool records no calibration run).
    """
    labels = _labels(check_run_id(run_id), COMPONENT_SIMULATE)
    labels.update({ENGINE_LABEL: engine, BACKEND_LABEL: checks.slug(backend)})
    args = [
        "simulate", model,
        "--store", spec.store,
        "--platform", platform,
        "--engine", engine,
        "--backend", backend,
        *_dtype_flag(spec),
        *workload_args,
        *(() if host_overhead else ("--no-cpu-overhead",)),
        "--output", "json",
    ]
    requests = {"cpu": spec.merge_resources.cpu, "memory": spec.merge_resources.memory}
    container = _container(
        "simulate", spec.controller_image, args, [*_s3_env(spec)], requests, {"memory": spec.merge_resources.memory}
    )
    annotations = {BACKEND_ANNOTATION: backend, f"{LABEL_PREFIX}/model": model}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(spec, job_name(APP_NAME, run_id, "sim", model, engine, backend), labels, annotations),
        "spec": {
            "completions": 1,
            "backoffLimit": 0,
            "podFailurePolicy": _pod_failure_policy(),
            "activeDeadlineSeconds": spec.merge_deadline_s,
            "ttlSecondsAfterFinished": spec.ttl_after_finished_s,
            "template": {"metadata": {"labels": dict(labels)}, "spec": _pod_spec([container], init_containers=[])},
        },
    }


def build_run_manifests(spec: FleetSpec, *, run_id: str) -> list[dict]:
    """What `dooly fleet submit` creates for one run: the profiling Jobs and the suspended merge Job."""
    return [*build_profile_jobs(spec, run_id=run_id), build_merge_job(spec, run_id=run_id, suspend=True)]


def controller_timeout_s(spec: FleetSpec) -> int:
    """How long the in-cluster controller waits for a whole run."""
    return spec.profile_deadline_s + spec.merge_deadline_s + CONTROLLER_SLACK_S


def build_cronjob(spec: FleetSpec) -> dict:
    """The nightly CronJob: `dooly fleet submit --wait` in the cluster, one run at a time."""
    labels = {NAME_LABEL: APP_NAME, COMPONENT_LABEL: COMPONENT_CONTROLLER, MANAGED_BY_LABEL: APP_NAME}
    timeout = controller_timeout_s(spec)
    args = [
        "fleet", "submit",
        "--executor", "kubernetes",
        "--wait",
        "--timeout", str(timeout),
        "--fleet", f"{FLEET_MOUNT_DIR}/{FLEET_CONFIGMAP_KEY}",
    ]
    requests = {"cpu": spec.controller_resources.cpu, "memory": spec.controller_resources.memory}
    container = _container(
        "controller", spec.controller_image, args, [], requests, {"memory": spec.controller_resources.memory}
    )
    container["volumeMounts"].append({"name": "fleet", "mountPath": FLEET_MOUNT_DIR, "readOnly": True})
    pod = _pod_spec([container], init_containers=[], service_account=CONTROLLER_SERVICE_ACCOUNT)
    pod["volumes"].append({"name": "fleet", "configMap": {"name": FLEET_CONFIGMAP}})
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": _metadata(spec, CRONJOB_NAME, labels, {}),
        "spec": {
            "schedule": spec.schedule,
            "timeZone": spec.time_zone,
            "concurrencyPolicy": "Forbid",
            "startingDeadlineSeconds": CONTROLLER_STARTING_DEADLINE_S,
            "successfulJobsHistoryLimit": CONTROLLER_HISTORY,
            "failedJobsHistoryLimit": CONTROLLER_HISTORY,
            "jobTemplate": {
                "metadata": {"labels": dict(labels)},
                "spec": {
                    # A second controller would submit a second run: never retry it automatically.
                    "backoffLimit": 0,
                    "activeDeadlineSeconds": timeout + CONTROLLER_SLACK_S,
                    "ttlSecondsAfterFinished": spec.ttl_after_finished_s,
                    "template": {"metadata": {"labels": dict(labels)}, "spec": pod},
                },
            },
        },
    }


def build_setup_manifests(spec: FleetSpec) -> list[dict]:
    """What k8s/ holds: namespace, service accounts, a least-privilege Role, the fleet ConfigMap, the CronJob."""
    labels = {NAME_LABEL: APP_NAME, MANAGED_BY_LABEL: APP_NAME}
    namespace = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": spec.namespace,
            "labels": {
                **labels,
                # Every dooly pod satisfies the `restricted` Pod Security Standard.
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/warn": "restricted",
            },
        },
    }
    controller_sa = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(spec, CONTROLLER_SERVICE_ACCOUNT, labels, {}),
    }
    worker_sa = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(spec, WORKER_SERVICE_ACCOUNT, labels, {}),
        "automountServiceAccountToken": False,
    }
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(spec, CONTROLLER_ROLE, labels, {}),
        "rules": [
            {
                "apiGroups": ["batch"],
                "resources": ["jobs"],
                # patch resumes the merge Job; delete rolls back a half-submitted run.
                "verbs": ["create", "get", "list", "watch", "patch", "delete"],
            },
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(spec, CONTROLLER_ROLE, labels, {}),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": CONTROLLER_ROLE},
        "subjects": [{"kind": "ServiceAccount", "name": CONTROLLER_SERVICE_ACCOUNT, "namespace": spec.namespace}],
    }
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(spec, FLEET_CONFIGMAP, labels, {}),
        "data": {FLEET_CONFIGMAP_KEY: spec.text},
    }
    return [namespace, controller_sa, worker_sa, role, binding, configmap, build_cronjob(spec)]


def _labels(run_id: str, component: str) -> dict[str, str]:
    return {NAME_LABEL: APP_NAME, COMPONENT_LABEL: component, MANAGED_BY_LABEL: APP_NAME, RUN_LABEL: run_id}


def _metadata(spec: FleetSpec, name: str, labels: dict, annotations: dict) -> dict:
    metadata: dict[str, Any] = {"name": name, "namespace": spec.namespace, "labels": dict(labels)}
    if annotations:
        metadata["annotations"] = dict(annotations)
    return metadata


def _dtype_flag(spec: FleetSpec) -> list[str]:
    return ["--dtype", spec.dtype] if spec.dtype else []


def _s3_env(spec: FleetSpec) -> list[dict]:
    if not spec.is_s3:
        return []
    ref = [(key, False) for key in S3_SECRET_KEYS_REQUIRED] + [(key, True) for key in S3_SECRET_KEYS_OPTIONAL]
    return [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": spec.s3_secret, "key": key, "optional": optional}}}
        for key, optional in ref
    ] + [
        {"name": RETRY_DEADLINE_ENV, "value": str(POD_S3_RETRY_DEADLINE_S)},
        {"name": CONNECT_DEADLINE_ENV, "value": str(POD_S3_CONNECT_DEADLINE_S)},
    ]


def _container(
    name: str,
    image: str,
    args: list[str],
    env: list[dict],
    requests: dict[str, str],
    limits: dict[str, str],
    *,
    shm: bool = False,
) -> dict:
    mounts = [{"name": "tmp", "mountPath": TMP_DIR}, {"name": "cache", "mountPath": CACHE_DIR}]
    if shm:
        mounts.append({"name": "dshm", "mountPath": SHM_DIR})
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": [APP_NAME],
        "args": args,
        "env": env,
        "resources": {"requests": requests, "limits": limits},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
    }
    if not env:
        del container["env"]
    return container


def _pod_spec(
    containers: list[dict],
    *,
    init_containers: list[dict],
    shm: bool = False,
    service_account: str = WORKER_SERVICE_ACCOUNT,
) -> dict:
    volumes = [
        {"name": "tmp", "emptyDir": {"sizeLimit": TMP_SIZE}},
        {"name": "cache", "emptyDir": {"sizeLimit": CACHE_SIZE}},
    ]
    if shm:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}})
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": service_account,
        # Only the controller talks to the API server.
        "automountServiceAccountToken": service_account == CONTROLLER_SERVICE_ACCOUNT,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_UID,
            "runAsGroup": RUN_AS_UID,
            "fsGroup": RUN_AS_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": containers,
        "volumes": volumes,
    }
    if init_containers:
        pod["initContainers"] = init_containers
    return pod


def _pod_failure_policy() -> dict:
    """Exit codes decide (docs/errors.md): bad input and a refused shrinking merge fail the Job at
    once; a transient store failure is retried, counted against backoffLimit(PerIndex)."""
    return {
        "rules": [
            # Bad input fails every shard alike: stop at once instead of burning retries.
            {
                "action": "FailJob",
                "onExitCodes": {"operator": "In", "values": [USER_ERROR_EXIT_CODE, MERGE_SHRINK_EXIT_CODE]},
            },
            # The store was down or throttling past the pod's own retry deadline: try this index again.
            {"action": "Count", "onExitCodes": {"operator": "In", "values": [TRANSIENT_EXIT_CODE]}},
            # Preemption or node drain is not the pod's fault: retry without counting it.
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]
    }


class _ManifestDumper(yaml.SafeDumper):
    """Block style for multi-line strings (the fleet file in the ConfigMap stays readable), and no
    YAML anchors where two containers share one env list: each object reads on its own."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ManifestDumper.add_representer(str, _represent_str)


def to_yaml(manifests: list[dict]) -> str:
    """Multi-document YAML that `kubectl apply -f -` reads."""
    return yaml.dump_all(manifests, Dumper=_ManifestDumper, sort_keys=False, explicit_start=True, width=120)

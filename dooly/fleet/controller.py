"""Submit a run's Jobs to a Kubernetes cluster, follow them, resume the merge, read their logs.

The official `kubernetes` client talks to the API server, in-cluster (the CronJob's service account)
or through a kubeconfig. A run is the set of Jobs labelled with one run id: the profiling Jobs and
one merge Job created suspended; `wait` resumes the merge once every profiling Job has finished
(succeeded or failed: a failed shard only leaves signatures for the next night), then waits for it.

Submission is all-or-nothing: the manifests are checked locally, the API is asked for a
server-side dry run of every object, and only then are they created; if a creation still fails,
the Jobs already created for the run are deleted again.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from dooly.errors import DoolyError
from dooly.fleet import checks, jobs

log = logging.getLogger(__name__)

# Seconds: (connect, read) for every API call, so an unreachable cluster fails fast.
REQUEST_TIMEOUT_S = (5, 30)
DEFAULT_POLL_S = 10.0
MERGE_PATCH = "application/merge-patch+json"
IN_CLUSTER_ENV = "KUBERNETES_SERVICE_HOST"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"

PHASE_SUCCEEDED = "succeeded"
PHASE_FAILED = "failed"
PHASE_SUSPENDED = "suspended"
PHASE_RUNNING = "running"
PHASE_PENDING = "pending"
FINISHED_PHASES = (PHASE_SUCCEEDED, PHASE_FAILED)


@dataclass(frozen=True)
class JobState:
    """A Job of a run as the API reports it."""

    name: str
    component: str
    gpu_type: str
    engine: str
    backend: str
    completions: int
    succeeded: int
    failed: int
    active: int
    phase: str
    reason: str
    failed_indexes: str

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED_PHASES

    @classmethod
    def from_job(cls, job: dict) -> JobState:
        metadata, spec, status = job.get("metadata") or {}, job.get("spec") or {}, job.get("status") or {}
        labels = metadata.get("labels") or {}
        annotations = metadata.get("annotations") or {}
        conditions = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
        reason = ""
        if "Complete" in conditions:
            phase = PHASE_SUCCEEDED
        elif "Failed" in conditions:
            phase, reason = PHASE_FAILED, conditions["Failed"].get("reason") or ""
        elif spec.get("suspend"):
            phase = PHASE_SUSPENDED
        elif status.get("active"):
            phase = PHASE_RUNNING
        else:
            phase = PHASE_PENDING
        return cls(
            name=metadata.get("name", ""),
            component=labels.get(jobs.COMPONENT_LABEL, ""),
            gpu_type=labels.get(jobs.GPU_TYPE_LABEL, ""),
            engine=labels.get(jobs.ENGINE_LABEL, ""),
            backend=annotations.get(jobs.BACKEND_ANNOTATION, ""),
            completions=int(spec.get("completions") or 1),
            succeeded=int(status.get("succeeded") or 0),
            failed=int(status.get("failed") or 0),
            active=int(status.get("active") or 0),
            phase=phase,
            reason=reason,
            failed_indexes=status.get("failedIndexes") or "",
        )


@dataclass(frozen=True)
class RunStatus:
    """All Jobs of one run, and whether waiting for them ran out of time."""

    run_id: str
    jobs: tuple[JobState, ...]
    timed_out: bool = False

    @property
    def finished(self) -> bool:
        return all(j.finished for j in self.jobs)

    @property
    def succeeded(self) -> bool:
        return not self.timed_out and all(j.phase == PHASE_SUCCEEDED for j in self.jobs)

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "finished": self.finished,
            "succeeded": self.succeeded,
            "timed_out": self.timed_out,
            "jobs": [asdict(j) for j in self.jobs],
        }


@dataclass(frozen=True)
class PodLog:
    pod: str
    container: str
    text: str


class FleetController:
    """The API calls dooly makes, in one namespace, each turned into a one-line DoolyError on failure."""

    def __init__(self, api_client: client.ApiClient, namespace: str) -> None:
        self.api_client = api_client
        self.namespace = namespace
        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.host = api_client.configuration.host

    @classmethod
    def connect(cls, namespace: str, *, kubeconfig: str | None = None, context: str | None = None) -> FleetController:
        """In-cluster configuration inside a pod (unless a kubeconfig is given), else the kubeconfig."""
        configuration = client.Configuration()
        try:
            if kubeconfig is None and context is None and os.environ.get(IN_CLUSTER_ENV):
                config.load_incluster_config(client_configuration=configuration)
            else:
                config.load_kube_config(
                    config_file=kubeconfig, context=context, client_configuration=configuration, persist_config=False
                )
        except (config.ConfigException, OSError) as exc:
            where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
            raise DoolyError(f"no usable Kubernetes configuration (kubeconfig {where}): {exc}") from exc
        # One attempt per call: an unreachable cluster is reported at once, not after minutes of retries.
        configuration.retries = 0
        return cls(client.ApiClient(configuration), namespace)

    def _call(self, what: str, function: Callable, *args, **kwargs) -> Any:
        try:
            return function(*args, _request_timeout=REQUEST_TIMEOUT_S, **kwargs)
        except ApiException as exc:
            raise DoolyError(f"Kubernetes API refused to {what}: {exc.status} {_api_message(exc)}") from exc
        except HTTPError as exc:
            raise DoolyError(f"cannot reach the Kubernetes API at {self.host} ({type(exc).__name__})") from exc

    def check_reachable(self) -> None:
        self._call(f"list Jobs in namespace {self.namespace}", self.batch.list_namespaced_job, self.namespace, limit=1)

    def submit(self, manifests: list[dict]) -> list[str]:
        """Create a run's Jobs, all or none; returns their names."""
        checks.require_valid(manifests)
        for manifest in manifests:
            kind, metadata = manifest.get("kind"), manifest["metadata"]
            if kind != "Job" or metadata.get("namespace") != self.namespace:
                raise DoolyError(
                    f"submit creates Jobs in namespace {self.namespace}; got {kind} {metadata.get('name')} "
                    f"in namespace {metadata.get('namespace')}"
                )
        self.check_reachable()
        bodies = [client.V1Job.from_dict(m) for m in manifests]
        for body, manifest in zip(bodies, manifests):
            self._call(
                f"accept Job {manifest['metadata']['name']} (dry run)",
                self.batch.create_namespaced_job,
                self.namespace,
                body,
                dry_run="All",
                field_validation="Strict",
            )
        created: list[str] = []
        try:
            for body, manifest in zip(bodies, manifests):
                name = manifest["metadata"]["name"]
                self._call(f"create Job {name}", self.batch.create_namespaced_job, self.namespace, body)
                created.append(name)
                log.info("created Job %s/%s", self.namespace, name)
        except DoolyError:
            self._roll_back(created)
            raise
        return created

    def _roll_back(self, names: list[str]) -> None:
        for name in names:
            try:
                self._call(
                    f"delete Job {name}",
                    self.batch.delete_namespaced_job,
                    name,
                    self.namespace,
                    propagation_policy="Background",
                )
                log.warning("rolled back Job %s/%s", self.namespace, name)
            except DoolyError as exc:
                log.error("could not roll back Job %s: %s", name, exc)

    def _list_jobs(self, selector: str) -> list[dict]:
        listing = self._call(
            f"list Jobs in namespace {self.namespace}",
            self.batch.list_namespaced_job,
            self.namespace,
            label_selector=selector,
        )
        return [self.api_client.sanitize_for_serialization(item) for item in listing.items or []]

    def latest_run_id(self) -> str:
        """The newest run in the namespace (run ids sort by their UTC start time)."""
        found = self._list_jobs(f"{jobs.MANAGED_BY_LABEL}={jobs.APP_NAME},{jobs.RUN_LABEL}")
        runs = {j["metadata"]["labels"][jobs.RUN_LABEL] for j in found}
        if not runs:
            raise DoolyError(f"no dooly runs in namespace {self.namespace}")
        return max(runs)

    def status(self, run_id: str) -> RunStatus:
        found = self._list_jobs(f"{jobs.RUN_LABEL}={run_id}")
        if not found:
            raise DoolyError(f"no Jobs of run {run_id} in namespace {self.namespace}")
        states = sorted((JobState.from_job(j) for j in found), key=lambda s: (s.component != "profile", s.name))
        return RunStatus(run_id=run_id, jobs=tuple(states))

    def resume(self, name: str) -> None:
        self._call(
            f"resume Job {name}",
            self.batch.patch_namespaced_job,
            name,
            self.namespace,
            {"spec": {"suspend": False}},
            _content_type=MERGE_PATCH,
        )
        log.info("resumed Job %s/%s", self.namespace, name)

    def wait(
        self,
        run_id: str,
        *,
        timeout_s: float,
        poll_s: float = DEFAULT_POLL_S,
        on_change: Callable[[RunStatus], None] | None = None,
    ) -> RunStatus:
        """Follow a run to its end: resume the merge Job once profiling is over, then wait for it."""
        deadline = time.monotonic() + timeout_s
        last: tuple = ()
        while True:
            run = self.status(run_id)
            profiling = [j for j in run.jobs if j.component == jobs.COMPONENT_PROFILE]
            if all(j.finished for j in profiling):
                for job in run.jobs:
                    if job.component == jobs.COMPONENT_MERGE and job.phase == PHASE_SUSPENDED:
                        self.resume(job.name)
            if run.jobs != last and on_change is not None:
                on_change(run)
            last = run.jobs
            if run.finished:
                return run
            if time.monotonic() + poll_s > deadline:
                return RunStatus(run_id=run_id, jobs=run.jobs, timed_out=True)
            time.sleep(poll_s)

    def logs(self, run_id: str, *, job: str | None = None, index: int | None = None) -> list[PodLog]:
        """The logs of every container of the run's pods (optionally of one Job, one index)."""
        selector = f"{jobs.RUN_LABEL}={run_id}"
        if job:
            selector += f",{JOB_NAME_LABEL}={job}"
        if index is not None:
            selector += f",batch.kubernetes.io/job-completion-index={index}"
        listing = self._call(
            f"list pods in namespace {self.namespace}", self.core.list_namespaced_pod, self.namespace,
            label_selector=selector,
        )
        pods = [self.api_client.sanitize_for_serialization(p) for p in listing.items or []]
        if not pods:
            raise DoolyError(f"no pods for {selector} in namespace {self.namespace}")
        result = []
        for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
            name = pod["metadata"]["name"]
            spec = pod.get("spec") or {}
            for container in (spec.get("initContainers") or []) + (spec.get("containers") or []):
                try:
                    text = self.core.read_namespaced_pod_log(
                        name, self.namespace, container=container["name"], _request_timeout=REQUEST_TIMEOUT_S
                    )
                except ApiException as exc:
                    text = f"(no log: {exc.status} {_api_message(exc)})\n"
                except HTTPError as exc:
                    raise DoolyError(f"cannot reach the Kubernetes API at {self.host} ({type(exc).__name__})") from exc
                result.append(PodLog(pod=name, container=container["name"], text=text or ""))
        return result


def _api_message(exc: ApiException) -> str:
    """The API server's own one-line message from a Status body, else the HTTP reason."""
    try:
        body = json.loads(exc.body or "")
    except ValueError:
        return str(exc.reason or "")
    message = body.get("message") if isinstance(body, dict) else None
    return str(message or exc.reason or "")

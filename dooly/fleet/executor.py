"""Run a Job manifest as local processes, the way a kubelet and the Job controller would.

`dooly fleet submit --executor local` and `dooly demo` run the very manifests `dooly fleet render`
prints, so what works on a laptop is what runs in the cluster: same command, arguments and
environment. What the local executor does for each part of a Job:

- Indexed Jobs: one process per completion index, `parallelism` at a time, with
  JOB_COMPLETION_INDEX set; `$(VAR)` in command and args is expanded like the kubelet does.
- Init containers run in order before the containers; a pod's containers run side by side.
- Env from a Secret (`secretKeyRef`) comes from a local secrets file ({secret: {key: value}}) or,
  failing that, from the environment variable of the same name; a missing one stops the Job before
  any process starts. `fieldRef` resolves the pod's name, namespace, labels and completion index.
- emptyDir volumes become fresh temporary directories; env values under their mount paths are
  rewritten to point there (pods write to /tmp and ~/.cache on a read-only root filesystem).
- Retries follow backoffLimitPerIndex / backoffLimit and podFailurePolicy exit-code rules
  (FailJob, FailIndex, Count; there are no disruptions locally, so `Ignore` counts as a failure to
  keep retries bounded); activeDeadlineSeconds kills what still runs.
- The program `dooly` is this interpreter's `python -m dooly.cli`, so no PATH set-up is needed.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dooly.errors import DoolyError

log = logging.getLogger(__name__)

COMPLETION_INDEX_ENV = "JOB_COMPLETION_INDEX"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
# Kubernetes' default when a Job sets no backoffLimit.
DEFAULT_BACKOFF_LIMIT = 6
# How often a waiting pod checks for a deadline or a FailJob decision elsewhere.
POLL_INTERVAL_S = 0.05
# Locally a terminating process gets at most this long after SIGTERM before SIGKILL.
LOCAL_GRACE_MAX_S = 5.0
REASON_COMPLETE = "Complete"
REASON_DEADLINE = "DeadlineExceeded"
REASON_POLICY = "PodFailurePolicy"
REASON_BACKOFF = "BackoffLimitExceeded"
REASON_FAILED_INDEXES = "FailedIndexes"
REASON_MAX_FAILED_INDEXES = "MaxFailedIndexesExceeded"
_VAR_REF = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")
_FIELD_LABEL = re.compile(r"^metadata\.(labels|annotations)\['([^']+)'\]$")


def default_programs() -> dict[str, list[str]]:
    """Container programs mapped to local command lines: `dooly` runs in this interpreter."""
    return {"dooly": [sys.executable, "-m", "dooly.cli"]}


@dataclass
class PodResult:
    """One attempt of one pod: its completion index, exit code and the output of each container."""

    name: str
    index: int | None
    attempt: int
    exit_code: int | None  # None when the pod was killed (deadline, FailJob elsewhere)
    seconds: float
    stdout: dict[str, str] = field(default_factory=dict)  # container name -> stdout
    stderr: dict[str, str] = field(default_factory=dict)
    failed_container: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0


@dataclass
class JobResult:
    """How a Job ended, with every pod attempt."""

    name: str
    succeeded: bool
    reason: str
    seconds: float
    pods: list[PodResult]
    failed_indexes: list[int] = field(default_factory=list)

    def outputs(self, container: str) -> list[str]:
        """Stdout of `container` from each succeeded pod, in index order."""
        done = [p for p in self.pods if p.succeeded]
        done.sort(key=lambda p: (p.index is None, p.index or 0, p.attempt))
        return [p.stdout.get(container, "") for p in done]


@dataclass
class _Container:
    name: str
    argv: list[str]
    env: list[tuple[str, Any]]  # name -> str, or a deferred fieldRef path
    mounts: list[tuple[str, str]]  # (volume name, mount path)
    cwd: str | None


@dataclass
class _Plan:
    """A Job resolved for local execution."""

    name: str
    spec: dict
    pod_spec: dict
    pod_meta: dict
    volumes: dict
    init: list[_Container]
    main: list[_Container]


@dataclass
class _JobState:
    """What the pods of one Job share while it runs."""

    deadline: float | None
    backoff_limit: int
    per_index: int | None
    max_failed_indexes: int | None
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    reason: str = REASON_COMPLETE
    total_failures: int = 0
    failed_indexes: list[int] = field(default_factory=list)
    pods: list[PodResult] = field(default_factory=list)

    def finish(self, reason: str) -> None:
        with self.lock:
            if not self.stop.is_set():
                self.reason = reason
                self.stop.set()


class LocalExecutor:
    """Runs Job manifests as local processes (see the module docstring for the semantics)."""

    def __init__(
        self,
        *,
        secrets_file: str | Path | None = None,
        programs: Mapping[str, Sequence[str]] | None = None,
        cwd: str | Path | None = None,
    ) -> None:
        self.secrets = _load_secrets(secrets_file)
        self.secrets_source = str(secrets_file) if secrets_file else None
        self.programs = {k: list(v) for k, v in (programs or default_programs()).items()}
        self.cwd = str(cwd) if cwd else None

    def run_job(self, job_manifest: dict, *, env: Mapping[str, str]) -> JobResult:
        """Run one Job to completion and return how it ended.

        `env` is the base environment of every process (usually `os.environ`); the containers' own
        env comes on top. Everything is resolved before the first process starts, so a missing
        secret or an unknown program is a DoolyError with nothing run.
        """
        plan = self._plan(job_manifest, env)
        name, spec, pod_spec = plan.name, plan.spec, plan.pod_spec
        pod_meta, volumes, init, main = plan.pod_meta, plan.volumes, plan.init, plan.main
        indexed = spec.get("completionMode") == "Indexed"
        completions = int(spec.get("completions", 1))
        parallelism = max(1, min(int(spec.get("parallelism", 1)), completions))
        deadline_s = spec.get("activeDeadlineSeconds")
        state = _JobState(
            deadline=time.monotonic() + deadline_s if deadline_s else None,
            backoff_limit=int(spec.get("backoffLimit", DEFAULT_BACKOFF_LIMIT)),
            per_index=spec.get("backoffLimitPerIndex") if indexed else None,
            max_failed_indexes=spec.get("maxFailedIndexes") if indexed else None,
        )
        rules = (spec.get("podFailurePolicy") or {}).get("rules") or []
        grace = min(float(pod_spec.get("terminationGracePeriodSeconds", LOCAL_GRACE_MAX_S)), LOCAL_GRACE_MAX_S)
        started = time.monotonic()
        log.info("job %s: %d pod(s), %d at a time", name, completions, parallelism)

        def slot(position: int) -> bool:
            index = position if indexed else None
            attempt = 0
            while not state.stop.is_set():
                pod = self._run_pod(name, index, attempt, init, main, pod_meta, volumes, dict(env), state, grace)
                with state.lock:
                    state.pods.append(pod)
                if pod.succeeded:
                    return True
                if pod.exit_code is None:
                    return False
                action = _policy_action(rules, pod)
                if action == "FailJob":
                    state.finish(REASON_POLICY)
                    return False
                attempt += 1
                if not self._retry(state, index, attempt, action):
                    return False
            return False

        with ThreadPoolExecutor(max_workers=parallelism, thread_name_prefix=f"job-{name}") as pool:
            outcomes = list(pool.map(slot, range(completions)))
        succeeded = all(outcomes) and not state.stop.is_set()
        reason = REASON_COMPLETE if succeeded else state.reason
        if not succeeded and reason == REASON_COMPLETE:
            reason = REASON_FAILED_INDEXES if state.failed_indexes else REASON_BACKOFF
        result = JobResult(
            name=name,
            succeeded=succeeded,
            reason=reason,
            seconds=time.monotonic() - started,
            pods=sorted(state.pods, key=lambda p: (p.index or 0, p.attempt)),
            failed_indexes=sorted(state.failed_indexes),
        )
        log.info("job %s: %s after %.1f s", name, result.reason, result.seconds)
        return result

    def check_job(self, job_manifest: dict, *, env: Mapping[str, str]) -> None:
        """Resolve what `run_job` would (programs, secrets, field references) without running anything.

        Call it for every Job of a pipeline first, so a missing secret in the last Job stops the
        pipeline before the first Job spends any time.
        """
        self._plan(job_manifest, env)

    def _plan(self, job_manifest: dict, env: Mapping[str, str]) -> _Plan:
        if job_manifest.get("kind") != "Job":
            raise DoolyError(f"the local executor runs Jobs, not {job_manifest.get('kind')!r}")
        metadata = job_manifest.get("metadata") or {}
        name = metadata.get("name", "job")
        spec = job_manifest.get("spec") or {}
        template = spec.get("template") or {}
        pod_spec = template.get("spec") or {}
        pod_meta = {
            "namespace": metadata.get("namespace", "default"),
            "labels": (template.get("metadata") or {}).get("labels") or {},
            "annotations": (template.get("metadata") or {}).get("annotations") or {},
            "serviceAccountName": pod_spec.get("serviceAccountName", "default"),
        }
        volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
        init = [self._prepare(c, volumes, env) for c in pod_spec.get("initContainers") or []]
        main = [self._prepare(c, volumes, env) for c in pod_spec.get("containers") or []]
        if not main:
            raise DoolyError(f"Job {name} has no containers to run")
        return _Plan(name, spec, pod_spec, pod_meta, volumes, init, main)

    def _retry(self, state: _JobState, index: int | None, attempt: int, action: str | None) -> bool:
        """Whether the failed pod at `index` gets another attempt; records the Job's fate if not."""
        with state.lock:
            if state.per_index is not None and index is not None:
                if action == "FailIndex" or attempt > state.per_index:
                    state.failed_indexes.append(index)
                    too_many = state.max_failed_indexes is not None and len(state.failed_indexes) > state.max_failed_indexes
                    if too_many:
                        state.reason = REASON_MAX_FAILED_INDEXES
                        state.stop.set()
                    return False
                return True
            state.total_failures += 1
            if state.total_failures > state.backoff_limit:
                state.reason = REASON_BACKOFF
                state.stop.set()
                return False
            return True

    def _prepare(self, container: dict, volumes: dict, env: Mapping[str, str]) -> _Container:
        """Resolve a container's program and static env now, so bad input fails before anything runs."""
        name = container.get("name", "?")
        command = list(container.get("command") or [])
        if not command:
            raise DoolyError(f"container {name}: the local executor needs an explicit command (no image entrypoint)")
        program = self.programs.get(command[0])
        if program is None and shutil.which(command[0], path=env.get("PATH")) is None:
            raise DoolyError(f"container {name}: program {command[0]!r} is not installed here")
        resolved_env: list[tuple[str, Any]] = []
        for item in container.get("env") or []:
            value = self._env_value(name, item, env)
            if value is not None:
                resolved_env.append((item["name"], value))
        for source in container.get("envFrom") or []:
            raise DoolyError(f"container {name}: envFrom ({', '.join(source)}) is not supported locally; use env")
        mounts = []
        for mount in container.get("volumeMounts") or []:
            volume = volumes.get(mount.get("name"))
            if volume is None or "emptyDir" not in volume:
                continue
            mounts.append((mount["name"], mount["mountPath"]))
        argv = (program or command[:1]) + command[1:] + list(container.get("args") or [])
        working_dir = container.get("workingDir")
        cwd = working_dir if working_dir and Path(working_dir).is_dir() else self.cwd
        return _Container(name=name, argv=argv, env=resolved_env, mounts=mounts, cwd=cwd)

    def _env_value(self, container: str, item: dict, env: Mapping[str, str]) -> Any:
        name = item.get("name", "")
        if "valueFrom" not in item:
            return str(item.get("value", ""))
        source = item["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            secret, key = ref.get("name"), ref.get("key")
            if key in self.secrets.get(secret, {}):
                return str(self.secrets[secret][key])
            if name in env:
                return env[name]
            if ref.get("optional"):
                return None
            elsewhere = f"add it to {self.secrets_source}" if self.secrets_source else "give a secrets file"
            raise DoolyError(
                f"container {container}: env {name} needs key {key!r} of Secret {secret!r}: "
                f"set the environment variable {name} or {elsewhere}"
            )
        if "fieldRef" in source:
            return ("field", source["fieldRef"].get("fieldPath", ""))
        raise DoolyError(f"container {container}: env {name}: only value, secretKeyRef and fieldRef run locally")

    def _run_pod(
        self,
        job: str,
        index: int | None,
        attempt: int,
        init: list[_Container],
        main: list[_Container],
        meta: dict,
        volumes: dict,
        base_env: dict[str, str],
        state: _JobState,
        grace: float,
    ) -> PodResult:
        pod_name = f"{job}-{index}-{attempt}" if index is not None else f"{job}-{attempt}"
        started = time.monotonic()
        result = PodResult(name=pod_name, index=index, attempt=attempt, exit_code=0, seconds=0.0)
        with tempfile.TemporaryDirectory(prefix=f"dooly-{pod_name}-") as scratch:
            volume_dirs = {}
            for volume in volumes:
                path = Path(scratch) / volume
                path.mkdir()
                volume_dirs[volume] = str(path)
            log.info("pod %s: started", pod_name)
            for container in init:
                code = self._run_containers([container], pod_name, index, meta, volume_dirs, base_env, state, grace, result)
                if code != 0:
                    result.exit_code = code
                    break
            else:
                result.exit_code = self._run_containers(
                    main, pod_name, index, meta, volume_dirs, base_env, state, grace, result
                )
        result.seconds = time.monotonic() - started
        log.info("pod %s: exit %s after %.1f s", pod_name, result.exit_code, result.seconds)
        return result

    def _run_containers(
        self,
        containers: list[_Container],
        pod_name: str,
        index: int | None,
        meta: dict,
        volume_dirs: dict[str, str],
        base_env: dict[str, str],
        state: _JobState,
        grace: float,
        result: PodResult,
    ) -> int | None:
        """Start the containers together; the first non-zero exit code (or None if killed) wins."""
        running = []
        for container in containers:
            env = self._container_env(container, pod_name, index, meta, volume_dirs)
            argv = [_expand(arg, env) for arg in container.argv]
            process = subprocess.Popen(
                argv,
                env={**base_env, **env},
                cwd=container.cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            readers = [
                _Reader(process.stdout, None),
                _Reader(process.stderr, f"{pod_name}/{container.name}"),
            ]
            running.append((container, process, readers))
        outcome: int | None = 0
        for container, process, readers in running:
            code = self._wait(process, state, grace)
            result.stdout[container.name] = readers[0].text()
            result.stderr[container.name] = readers[1].text()
            if code != 0 and outcome == 0:
                outcome = code
                result.failed_container = container.name
        return outcome

    def _container_env(
        self, container: _Container, pod_name: str, index: int | None, meta: dict, volume_dirs: dict[str, str]
    ) -> dict[str, str]:
        env: dict[str, str] = {}
        if index is not None:
            env[COMPLETION_INDEX_ENV] = str(index)
        for name, value in container.env:
            if isinstance(value, tuple):
                value = _field_value(value[1], pod_name, index, meta)
            env[name] = _expand(value, env)
        for volume, mount_path in container.mounts:
            for name, value in env.items():
                if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
                    env[name] = volume_dirs[volume] + value[len(mount_path.rstrip("/")):]
        return env

    def _wait(self, process: subprocess.Popen, state: _JobState, grace: float) -> int | None:
        """The exit code, or None once the Job's deadline passed or another pod failed the Job."""
        while True:
            try:
                return process.wait(timeout=POLL_INTERVAL_S)
            except subprocess.TimeoutExpired:
                pass
            if state.deadline is not None and time.monotonic() > state.deadline:
                state.finish(REASON_DEADLINE)
            if state.stop.is_set():
                _terminate(process, grace)
                return None


class _Reader:
    """Drains one pipe on a thread; stderr lines are also logged live with the pod's name."""

    def __init__(self, pipe, prefix: str | None) -> None:
        self._chunks: list[str] = []
        self._prefix = prefix
        self._thread = threading.Thread(target=self._drain, args=(pipe,), daemon=True)
        self._thread.start()

    def _drain(self, pipe) -> None:
        with pipe:
            for raw in pipe:
                line = raw.decode("utf-8", errors="replace")
                self._chunks.append(line)
                if self._prefix:
                    log.info("[%s] %s", self._prefix, line.rstrip())

    def text(self) -> str:
        self._thread.join()
        return "".join(self._chunks)


def _terminate(process: subprocess.Popen, grace: float) -> None:
    """SIGTERM the process group we started, then SIGKILL what is left after the grace period."""
    for sig, wait_s in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: defined variables are replaced, `$$` escapes, others stay."""

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)

    return _VAR_REF.sub(replace, text)


def _field_value(path: str, pod_name: str, index: int | None, meta: dict) -> str:
    if path == "metadata.name":
        return pod_name
    if path == "metadata.namespace":
        return meta["namespace"]
    if path == "spec.serviceAccountName":
        return meta["serviceAccountName"]
    if path == "spec.nodeName":
        return socket.gethostname()
    if path in ("status.podIP", "status.hostIP"):
        return "127.0.0.1"
    match = _FIELD_LABEL.match(path)
    if match:
        kind, key = match.groups()
        if kind == "annotations" and key == COMPLETION_INDEX_ANNOTATION:
            if index is None:
                raise DoolyError(f"{path}: only Indexed Jobs have a completion index")
            return str(index)
        values = meta[kind]
        if key in values:
            return str(values[key])
        raise DoolyError(f"fieldRef {path}: the pod has no such {kind[:-1]}")
    raise DoolyError(f"fieldRef {path!r} is not available to local processes")


def _policy_action(rules: list[dict], pod: PodResult) -> str | None:
    """The podFailurePolicy action of the first rule matching a failed pod's exit code."""
    for rule in rules:
        on_codes = rule.get("onExitCodes")
        if not on_codes or on_codes.get("containerName") not in (None, pod.failed_container):
            continue
        values = set(on_codes.get("values") or [])
        code = pod.exit_code
        matches = code in values if on_codes.get("operator") == "In" else code not in values
        if code and matches:
            action = rule.get("action")
            return "Count" if action == "Ignore" else action
    return None


def _load_secrets(path: str | Path | None) -> dict[str, dict[str, str]]:
    """A local secrets file: YAML or JSON {secret name: {key: value}}."""
    if path is None:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise DoolyError(f"cannot read secrets file {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise DoolyError(f"secrets file {path} is not valid YAML or JSON: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise DoolyError(f"secrets file {path} must map each Secret name to {{key: value}}")
    return {str(name): {str(k): str(v) for k, v in keys.items()} for name, keys in data.items()}

"""A small Kubernetes API server on 127.0.0.1 for the controller tests.

It speaks the part of batch/v1 and core/v1 the kubernetes client uses for dooly: create (with
dryRun), list with label selectors, get, merge-patch and delete Jobs; list pods and read pod logs.
It stores what is created, records every request, checks the bearer token, and lets a test decide
how Jobs end (`finish`), or finish them automatically after a number of status polls.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

SERVER_STOP_TIMEOUT_S = 5
SHUTDOWN_POLL_S = 0.05
_JOBS = re.compile(r"^/apis/batch/v1/namespaces/(?P<ns>[^/]+)/jobs(?:/(?P<name>[^/]+))?$")
_PODS = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods(?:/(?P<name>[^/]+)(?P<log>/log)?)?$")


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _selector_matches(selector: str, labels: dict) -> bool:
    for term in filter(None, selector.split(",")):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key) != value:
                return False
        elif term not in labels:
            return False
    return True


class FakeKubeAPI:
    """State and behaviour of the fake API server; `start()` serves it on a free loopback port."""

    def __init__(self, *, namespaces=("dooly",), token: str = "test-token") -> None:
        self.namespaces = set(namespaces)
        self.token = token
        self.jobs: dict[tuple[str, str], dict] = {}
        self.pods: dict[tuple[str, str], dict] = {}
        self.logs: dict[tuple[str, str, str], str] = {}
        self.requests: list[tuple[str, str, dict]] = []
        self.lock = threading.Lock()
        # Reject the Nth (1-based) non-dry-run Job creation with this status, to test rollback.
        self.reject_create: tuple[int, int] | None = None
        # Finish running Jobs on their own after this many list calls; name -> "Complete" | "Failed".
        self.finish_after_polls: int | None = None
        self.outcomes: dict[str, str] = {}
        # For each merge-patch: (Job name, names of the Jobs that had not finished at that moment).
        self.patches: list[tuple[str, list[str]]] = []
        self._polls: dict[str, int] = {}
        self._creates = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the server first"
        host, port = self._server.server_address[:2]
        return f"http://{host if isinstance(host, str) else host.decode()}:{port}"

    def start(self) -> FakeKubeAPI:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                return

            def do_GET(self) -> None:
                api._handle(self, "GET")

            def do_POST(self) -> None:
                api._handle(self, "POST")

            def do_PATCH(self) -> None:
                api._handle(self, "PATCH")

            def do_DELETE(self) -> None:
                api._handle(self, "DELETE")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": SHUTDOWN_POLL_S}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=SERVER_STOP_TIMEOUT_S)

    # Test controls ------------------------------------------------------------------------------

    def finish(self, name: str, outcome: str, *, namespace: str = "dooly", reason: str = "BackoffLimitExceeded") -> None:
        """Give a Job the status the Job controller would: Complete, or Failed with a reason."""
        with self.lock:
            job = self.jobs[(namespace, name)]
            completions = job["spec"].get("completions", 1)
            if outcome == "Complete":
                status = {"succeeded": completions, "conditions": [self._condition("Complete", "")]}
            else:
                status = {"failed": 1, "failedIndexes": "0", "conditions": [self._condition("Failed", reason)]}
            job["status"] = {**status, "startTime": _now(), "completionTime": _now()}

    def add_pod(self, job: str, index: int, logs: dict[str, str], *, namespace: str = "dooly") -> str:
        """A pod of a Job (labels as the Job controller sets them) with a log per container."""
        with self.lock:
            template = self.jobs[(namespace, job)]["spec"]["template"]
            name = f"{job}-{index}-{uuid.uuid4().hex[:5]}"
            labels = {
                **(template.get("metadata") or {}).get("labels", {}),
                "batch.kubernetes.io/job-name": job,
                "batch.kubernetes.io/job-completion-index": str(index),
            }
            self.pods[(namespace, name)] = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace, "labels": labels, "uid": str(uuid.uuid4())},
                "spec": template["spec"],
                "status": {"phase": "Succeeded"},
            }
            for container, text in logs.items():
                self.logs[(namespace, name, container)] = text
            return name

    def created(self) -> list[str]:
        with self.lock:
            return [name for (_, name) in self.jobs]

    def calls(self, method: str) -> list[tuple[str, str, dict]]:
        with self.lock:
            return [r for r in self.requests if r[0] == method]

    # HTTP ---------------------------------------------------------------------------------------

    @staticmethod
    def _condition(kind: str, reason: str) -> dict:
        return {"type": kind, "status": "True", "reason": reason, "lastTransitionTime": _now(), "lastProbeTime": _now()}

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        url = urlparse(handler.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        with self.lock:
            self.requests.append((method, url.path, query))
        if handler.headers.get("Authorization") != f"Bearer {self.token}":
            return self._send(handler, 401, self._status(401, "Unauthorized", "Unauthorized"))
        jobs_match, pods_match = _JOBS.match(url.path), _PODS.match(url.path)
        if jobs_match:
            return self._jobs(handler, method, jobs_match["ns"], jobs_match["name"], query, raw)
        if pods_match and method == "GET":
            if pods_match["log"]:
                key = (pods_match["ns"], pods_match["name"], query.get("container", ""))
                with self.lock:
                    text = self.logs.get(key)
                if text is None:
                    return self._send(handler, 400, self._status(400, "BadRequest", "container not found"))
                return self._send_text(handler, text)
            return self._list(handler, "PodList", self.pods, pods_match["ns"], query)
        return self._send(handler, 404, self._status(404, "NotFound", f"no route for {method} {url.path}"))

    def _jobs(self, handler, method: str, namespace: str, name: str | None, query: dict, raw: bytes) -> None:
        if method == "GET" and name is None:
            self._advance(namespace)
            return self._list(handler, "JobList", self.jobs, namespace, query)
        if method == "POST" and name is None:
            return self._create(handler, namespace, json.loads(raw), dry_run=query.get("dryRun") == "All")
        if name is None:  # no collection-wide PATCH or DELETE here
            return self._send(handler, 404, self._status(404, "NotFound", f'jobs.batch "{name}" not found'))
        with self.lock:
            job = self.jobs.get((namespace, name))
        if job is None:
            return self._send(handler, 404, self._status(404, "NotFound", f'jobs.batch "{name}" not found'))
        if method == "GET":
            return self._send(handler, 200, job)
        if method == "PATCH":
            if handler.headers.get("Content-Type") != "application/merge-patch+json":
                return self._send(handler, 415, self._status(415, "UnsupportedMediaType", "merge patch only"))
            patch = json.loads(raw)
            with self.lock:
                unfinished = [n for (ns, n), j in self.jobs.items() if ns == namespace and not j["status"].get("conditions")]
                self.patches.append((name, [n for n in unfinished if n != name]))
                job["spec"].update(patch.get("spec") or {})
            return self._send(handler, 200, job)
        if method == "DELETE":
            with self.lock:
                del self.jobs[(namespace, name)]
            return self._send(handler, 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
        return self._send(handler, 405, self._status(405, "MethodNotAllowed", method))

    def _create(self, handler, namespace: str, body: dict, *, dry_run: bool) -> None:
        name = body.get("metadata", {}).get("name", "")
        if namespace not in self.namespaces:
            return self._send(handler, 404, self._status(404, "NotFound", f'namespaces "{namespace}" not found'))
        with self.lock:
            exists = (namespace, name) in self.jobs
            if not dry_run:
                self._creates += 1
            reject = self.reject_create if (
                self.reject_create is not None and not dry_run and self._creates == self.reject_create[0]) else None
        if exists:
            return self._send(handler, 409, self._status(409, "AlreadyExists", f'jobs.batch "{name}" already exists'))
        if reject is not None:
            code = reject[1]
            return self._send(handler, code, self._status(code, "Forbidden", "exceeded quota: gpu-quota"))
        job = json.loads(json.dumps(body))
        job["metadata"].update(
            {"uid": str(uuid.uuid4()), "creationTimestamp": _now(), "namespace": namespace, "resourceVersion": "1"}
        )
        job["status"] = {}
        if not dry_run:
            with self.lock:
                self.jobs[(namespace, name)] = job
        return self._send(handler, 201, job)

    def _advance(self, namespace: str) -> None:
        """Let running (not suspended, not finished) Jobs finish after enough polls."""
        if self.finish_after_polls is None:
            return
        due = []
        with self.lock:
            for (ns, name), job in self.jobs.items():
                if ns != namespace or job["spec"].get("suspend") or job["status"].get("conditions"):
                    continue
                self._polls[name] = self._polls.get(name, 0) + 1
                job["status"]["active"] = 1
                if self._polls[name] > self.finish_after_polls:
                    due.append(name)
        for name in due:
            self.finish(name, self.outcomes.get(name, "Complete"), namespace=namespace)

    def _list(self, handler, kind: str, store: dict, namespace: str, query: dict) -> None:
        selector = query.get("labelSelector", "")
        with self.lock:
            items = [
                obj for (ns, _), obj in store.items()
                if ns == namespace and _selector_matches(selector, obj["metadata"].get("labels") or {})
            ]
        limit = int(query.get("limit") or 0)
        if limit:
            items = items[:limit]
        api_version = "batch/v1" if kind == "JobList" else "v1"
        self._send(handler, 200, {"apiVersion": api_version, "kind": kind, "metadata": {}, "items": items})

    @staticmethod
    def _status(code: int, reason: str, message: str) -> dict:
        return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason,
                "code": code}

    @staticmethod
    def _send(handler, code: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    @staticmethod
    def _send_text(handler, text: str) -> None:
        data = text.encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "text/plain")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

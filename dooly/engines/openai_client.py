"""A client of an engine's OpenAI-compatible server, timing every request as a user would.

Both engines' HTTP ground truth goes through here: transformers' server (`dooly.engines.http_bench`)
and vLLM's (`dooly.engines.vllm_http_bench`). What differs between them is how a request asks for
its prompt and for exactly its output length (each builds its own request body) and how the server
is started; what a client sees is the same: the server is started as a subprocess on loopback and
polled until `/health` answers, requests arrive open loop at their workload times, each a streaming
`/v1/completions` request, and the client stamps its arrival, every streamed token, and the end.

A streamed chunk carries one token's text, or, where the server says which tokens a chunk holds
(vLLM's `token_ids`, asked for with `return_token_ids`), several: a server that falls behind its
client sends the tokens it has in one chunk, and each counts, stamped when its chunk arrived. A
request whose streamed tokens, or whose server-counted prompt or output tokens (`usage`), differ
from its workload's fails the run: the cell would not be the workload's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dooly.engines.groundtruth import RequestRecord
from dooly.errors import DoolyError, TransientError
from dooly.progress import ProgressLog, interval_from_env
from dooly.workload import Request

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
HEALTH_PATH = "/health"
COMPLETIONS_PATH = "/v1/completions"
# Loading a large model onto a GPU from a freshly written directory takes minutes.
SERVER_START_TIMEOUT_S = 1800.0
HEALTH_POLL_S = 0.25
HEALTH_PROBE_TIMEOUT_S = 2.0
SERVER_STOP_TIMEOUT_S = 30.0
# A streamed response that sends nothing for this long means the server stalled.
STREAM_STALL_TIMEOUT_S = 600.0
CONNECT_TIMEOUT_S = 10.0
SERVER_LOG_TAIL_LINES = 5
SSE_DATA = "data: "
SSE_DONE = "[DONE]"
SERVER_LOG_NAME = "server.log"

# A request body for a prompt (token ids) and the exact number of tokens to generate.
BodyFor = Callable[[list[int], int], dict[str, Any]]
# A prompt of the given length, drawn as the in-process harness draws it.
PromptFor = Callable[[int], list[int]]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """A server subprocess on loopback, its log in a file of the run's directory."""

    command: list[str]
    url: str
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def log_tail(self) -> str:
        if not self.log_path.is_file():
            return ""
        lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        return " | ".join(lines[-SERVER_LOG_TAIL_LINES:])


@contextmanager
def started_server(command_for_port: Callable[[int], list[str]], work_dir: Path,
                   env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """Start the server (in `env`, else this process's environment), wait until /health answers,
    stop it on exit (terminate, then kill)."""
    port = free_port()
    server = ServerProcess(command=command_for_port(port), url=f"http://{LOOPBACK}:{port}",
                           log_path=work_dir / SERVER_LOG_NAME)
    log.info("starting %s", " ".join(server.command))
    with server.log_path.open("wb") as log_file:
        server.process = subprocess.Popen(server.command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_healthy(server)
        yield server
    finally:
        server.process.terminate()
        try:
            server.process.wait(timeout=SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


def _wait_healthy(server: ServerProcess) -> None:
    import httpx

    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    assert server.process is not None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise DoolyError(f"the server exited with status {server.process.returncode} before it was ready: "
                             f"{server.log_tail()}")
        try:
            if httpx.get(server.url + HEALTH_PATH, timeout=HEALTH_PROBE_TIMEOUT_S).status_code == httpx.codes.OK:
                return
        except httpx.HTTPError:
            pass
        time.sleep(HEALTH_POLL_S)
    raise DoolyError(f"the server did not answer {HEALTH_PATH} within {SERVER_START_TIMEOUT_S:.0f} s: {server.log_tail()}")


def check_reachable(url: str) -> None:
    """Refuse, before anything runs, a --server-url that does not answer /health: exit 75, since a
    server still starting (or restarting) answers later."""
    import httpx

    try:
        response = httpx.get(url.rstrip("/") + HEALTH_PATH, timeout=CONNECT_TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise TransientError(f"--server-url {url} is unreachable: {exc}") from None
    if response.status_code != httpx.codes.OK:
        raise TransientError(f"--server-url {url}: {HEALTH_PATH} answered {response.status_code}")


def running_server(url: str, details: dict[str, Any], unreadable: str) -> str:
    """A `--server-url` server, started outside the command: refused unless it answers /health,
    warned about and recorded in DETAILS (bench.json's engine_details) as unverified, since what
    its engine resolved (UNREADABLE, in words) cannot be read from outside. Its base URL."""
    check_reachable(url)
    log.warning("UNVERIFIED ENGINE: --server-url %s was started outside this command, so what its engine resolved "
                "(%s) cannot be read or checked against the run's settings; the record says settings_verified: false",
                url, unreadable)
    details.update(server_url=url, server_command=None, server_resolved=None, settings_verified=False)
    return url.rstrip("/")


@dataclass
class Timing:
    """What the client saw of one streamed request."""

    arrived_s: float
    token_times_s: list[float] = field(default_factory=list)
    finished_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str = ""


async def _stream_one(client: Any, url: str, body: dict[str, Any]) -> Timing:
    timing = Timing(arrived_s=time.perf_counter())
    try:
        async with client.stream("POST", url + COMPLETIONS_PATH, json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")
                timing.error = f"HTTP {response.status_code}: {detail}"
                return timing
            async for line in response.aiter_lines():
                now = time.perf_counter()
                if not line.startswith(SSE_DATA):
                    continue
                data = line[len(SSE_DATA):].strip()
                if data == SSE_DONE:
                    break
                take_chunk(timing, json.loads(data), now)
    except Exception as exc:  # noqa: BLE001 - any transport failure is this request's error, recorded
        timing.error = f"{type(exc).__name__}: {exc}"
    timing.finished_s = time.perf_counter()
    return timing


def take_chunk(timing: Timing, chunk: dict[str, Any], now: float) -> None:
    """Stamp the tokens one streamed chunk carries: as many as its `token_ids` where the server
    lists them, else one per chunk with text."""
    if "error" in chunk:
        timing.error = str(chunk["error"])
        return
    for choice in chunk.get("choices") or []:
        token_ids = choice.get("token_ids")
        if token_ids:
            timing.token_times_s.extend([now] * len(token_ids))
        elif choice.get("text"):
            timing.token_times_s.append(now)
    usage = chunk.get("usage")
    if usage:
        timing.prompt_tokens = int(usage.get("prompt_tokens", 0))
        timing.completion_tokens = int(usage.get("completion_tokens", 0))


async def replay(url: str, requests: list[Request], prompts: dict[str, list[int]], body_for: BodyFor,
                 label: str = "") -> dict[str, Timing]:
    """Open loop: each request is sent at its arrival time whatever the server is doing. With a
    LABEL, the finished requests are logged every progress interval (a pass of a heavy workload
    runs for minutes)."""
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(STREAM_STALL_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
    ordered = sorted(requests, key=lambda r: r.arrival_s)
    progress = ProgressLog(len(ordered), label=label, unit="requests", device_seconds=False,
                           interval_s=interval_from_env()) if label else None
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

        async def counted(body: dict[str, Any]) -> Timing:
            timing = await _stream_one(client, url, body)
            if progress is not None:
                progress(1)
            return timing

        tasks: dict[str, asyncio.Task[Timing]] = {}
        origin = time.perf_counter()
        for request in ordered:
            delay = origin + request.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            body = body_for(prompts[request.request_id], request.output_tokens)
            tasks[request.request_id] = asyncio.create_task(counted(body))
        await asyncio.gather(*tasks.values())
    if progress is not None:
        progress.finish()
    return {rid: task.result() for rid, task in tasks.items()}


def token_count_errors(requests: list[Request], timings: dict[str, Timing]) -> list[str]:
    """Requests the server served otherwise than the workload: a prompt the server counted at
    another length (`usage.prompt_tokens`: it read the prompt as other ids), or an output not
    streamed at exactly its length, as counted at the client and by the server
    (`usage.completion_tokens`; EOS is off and max_tokens is the output length)."""
    found = []
    for request in requests:
        timing = timings[request.request_id]
        if timing.error:
            continue
        if timing.prompt_tokens != request.prompt_tokens:
            found.append(f"{request.request_id}'s prompt of {request.prompt_tokens} token(s) was counted as "
                         f"{timing.prompt_tokens} by the server")
        streamed = len(timing.token_times_s)
        if streamed != request.output_tokens or timing.completion_tokens != request.output_tokens:
            found.append(f"{request.request_id} streamed {streamed} token(s), the server counted "
                         f"{timing.completion_tokens}, the workload asked {request.output_tokens}")
    return found


def _record(request: Request, timing: Timing) -> RequestRecord:
    times = timing.token_times_s
    return RequestRecord(
        request_id=request.request_id,
        arrived_at_s=timing.arrived_s,
        first_token_s=times[0] if times else None,
        finished_s=timing.finished_s if not timing.error else None,
        prompt_tokens=request.prompt_tokens,
        output_tokens=len(times),
        token_times_s=times,
        error=timing.error,
    )


def _check_served(timings: dict[str, Timing], what: str, server: ServerProcess | None) -> None:
    failed = {rid: t.error for rid, t in timings.items() if t.error}
    if failed:
        rid, error = next(iter(failed.items()))
        tail = server.log_tail() if server is not None else ""
        raise DoolyError(f"{len(failed)} {what} request(s) failed at the server, e.g. {rid}: {error}"
                         + (f" (server log: {tail})" if tail else ""))


def serve_workload(url: str, requests: list[Request], *, prompt_for: PromptFor, body_for: BodyFor,
                   warmup: list[Request], warm_passes: int, server: ServerProcess | None = None) -> list[RequestRecord]:
    """The warm-up requests (all at once), the unrecorded warm passes, then the recorded pass.
    Prompts are drawn with `prompt_for` in that order, warm-up first, each pass in arrival order:
    the order in which the in-process harness draws them from the same seed. A failed warm-up
    names the end of `server`'s log, where the server was started here."""
    if warmup:
        warmup_prompts = {r.request_id: prompt_for(r.prompt_tokens) for r in warmup}
        _check_served(asyncio.run(replay(url, warmup, warmup_prompts, body_for)), "warm-up", server)
    recorded: dict[str, Timing] = {}
    ordered = sorted(requests, key=lambda r: r.arrival_s)
    for index in range(warm_passes + 1):
        prompts = {r.request_id: prompt_for(r.prompt_tokens) for r in ordered}
        label = f"warm pass {index + 1}/{warm_passes}" if index < warm_passes else "recorded pass"
        recorded = asyncio.run(replay(url, requests, prompts, body_for, label))
        if index < warm_passes:
            _check_served(recorded, f"warm pass {index}", server)
    wrong = token_count_errors(requests, recorded)
    if wrong:
        raise DoolyError(f"{len(wrong)} of {len(requests)} request(s) were served otherwise than the workload, "
                         f"e.g. {wrong[0]}")
    return [_record(r, recorded[r.request_id]) for r in requests]

"""Running N ranks of one host: the environment they need, how they are started, what links them.

Dooly starts the ranks of a tensor-parallel measurement itself (`launch`): one spawned process
per rank, rendezvous through a file store in a private directory, `nccl` on GPUs and `gloo` on
the CPU (the same code, so CI exercises it). Rank 0 reports to the parent through a queue as it
goes, so the parent can write results while the ranks are still measuring.

NVLink multicast (NVLS) stays off in every process that can touch NCCL: on shared multi-GPU
hosts a program using it can take the host's GPUs out of service. `apply_safe_env` sets the
variables in this process before any process group exists, and children inherit them; each
child sets them again before it initialises anything.

`detect_topology` reads how the ranks' devices are linked from the machine itself (`nvidia-smi
topo -m`, `nvidia-smi nvlink -s`, CUDA peer access), never from a label someone typed.
"""

from __future__ import annotations

import logging
import os
import queue as queue_module
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from dooly.errors import DoolyError

log = logging.getLogger(__name__)

# NVLink multicast off in NCCL, PyTorch symmetric memory and NVSHMEM.
SAFE_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
BACKEND_NCCL = "nccl"
BACKEND_GLOO = "gloo"
# How long a collective may block before the process group gives up (a hung peer, not a slow op).
COLLECTIVE_TIMEOUT_S = 600.0
# How often the parent looks at its children while waiting for messages.
POLL_S = 0.5
# How long children get to exit on their own once rank 0 said it is done.
JOIN_GRACE_S = 60.0
NVIDIA_SMI_TIMEOUT_S = 10
# A failed rank's last traceback line, as much as a one-line error should carry.
ERROR_CHARS = 500
# Link words of `nvidia-smi topo -m`, from the matrix legend.
_LINK_WORD = re.compile(r"^(X|SYS|NODE|PHB|PXB|PIX|NV\d+)$")
CPU_LINK = "loopback"
PEER_LINK = "peer"
NO_PEER_LINK = "no-peer"


def apply_safe_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Force the no-multicast variables into `environ` (this process's environment by default)."""
    target = os.environ if environ is None else environ
    for name, value in SAFE_ENV.items():
        if target.get(name) != value:
            if name in target:
                log.warning("overriding %s=%s with %s: NVLink multicast stays off", name, target[name], value)
            target[name] = value
    return dict(SAFE_ENV)


def backend_for(device: str) -> str:
    return BACKEND_NCCL if device == "cuda" else BACKEND_GLOO


def visible_devices(device: str) -> int:
    """How many ranks this host can run on `device` (CPU ranks are processes: no limit here)."""
    if device != "cuda":
        return 0
    import torch

    return torch.cuda.device_count()


def check_world(device: str, world_size: int, what: str) -> None:
    """Refuse before anything is written when the host cannot hold `world_size` ranks."""
    if world_size < 1:
        raise DoolyError(f"{what}: world size must be >= 1, got {world_size}")
    if device == "cuda":
        count = visible_devices(device)
        if count < world_size:
            raise DoolyError(
                f"{what} needs {world_size} GPUs (one per tensor-parallel rank); this process sees {count}"
            )


# ---------------------------------------------------------------------------------------------
# Topology


@dataclass(frozen=True)
class Topology:
    """How the ranks' devices are linked, as read from the machine.

    `label` is short and stable (it partitions the store: `NV18`, `PIX`, `NV18+SYS`, `peer`,
    `loopback`); `details` keeps what was read, verbatim, for provenance."""

    label: str
    backend: str
    comm_version: str
    world_size: int
    source: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "backend": self.backend,
            "comm_version": self.comm_version,
            "world_size": self.world_size,
            "source": self.source,
            **self.details,
        }


def detect_topology(device: str, world_size: int) -> Topology:
    """The links between devices 0..world_size-1 (CUDA), or the loopback of CPU ranks (gloo)."""
    import torch

    if device != "cuda":
        return Topology(
            label=CPU_LINK,
            backend=BACKEND_GLOO,
            comm_version=torch.__version__,
            world_size=world_size,
            source="cpu: gloo ranks are processes of this host talking over loopback TCP",
        )
    matrix_text = _nvidia_smi(["topo", "-m"])
    nvlink_text = _nvidia_smi(["nvlink", "-s"])
    peer = _peer_matrix(world_size)
    links = parse_topo_links(matrix_text, world_size) if matrix_text else []
    if links:
        label = "+".join(sorted(set(links)))
        source = "nvidia-smi topo -m"
    elif world_size > 1:
        everyone = all(peer[i][j] for i in range(world_size) for j in range(world_size) if i != j)
        label = PEER_LINK if everyone else NO_PEER_LINK
        source = "torch.cuda.can_device_access_peer (nvidia-smi unavailable)"
    else:
        label = "single"
        source = "one device: no links"
    return Topology(
        label=label,
        backend=BACKEND_NCCL,
        comm_version=nccl_version(),
        world_size=world_size,
        source=source,
        details={
            "devices": [torch.cuda.get_device_name(i) for i in range(min(world_size, torch.cuda.device_count()))],
            "peer_access": peer,
            "nvidia_smi_topo": matrix_text,
            "nvidia_smi_nvlink": nvlink_text,
        },
    )


def parse_topo_links(text: str, world_size: int) -> list[str]:
    """Link words between every pair of GPU0..GPU{world_size-1} in `nvidia-smi topo -m` output."""
    header: list[str] | None = None
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        cells = line.split()
        if not cells:
            continue
        if header is None and cells[0].startswith("GPU"):
            header = cells
            continue
        if header is not None and re.fullmatch(r"GPU\d+", cells[0]):
            rows[cells[0]] = cells[1 : 1 + len(header)]
    if header is None:
        return []
    wanted = [f"GPU{i}" for i in range(world_size)]
    links = []
    for a, name_a in enumerate(wanted):
        row = rows.get(name_a)
        if row is None:
            return []
        for b, name_b in enumerate(wanted):
            if b <= a:
                continue
            if name_b not in header:
                return []
            word = row[header.index(name_b)]
            if not _LINK_WORD.match(word):
                return []
            links.append(word)
    return links


def nccl_version() -> str:
    import torch

    try:
        version = torch.cuda.nccl.version()
    except (AttributeError, RuntimeError):
        return ""
    if isinstance(version, tuple):
        return ".".join(str(v) for v in version)
    return str(version)


def _nvidia_smi(arguments: list[str]) -> str:
    if shutil.which("nvidia-smi") is None:
        return ""
    try:
        result = subprocess.run(
            ["nvidia-smi", *arguments], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout


def _peer_matrix(world_size: int) -> list[list[bool]]:
    import torch

    count = min(world_size, torch.cuda.device_count())
    return [[i == j or bool(torch.cuda.can_device_access_peer(i, j)) for j in range(count)] for i in range(count)]


# ---------------------------------------------------------------------------------------------
# Launching ranks


@dataclass
class RankContext:
    """What a rank's target function gets: who it is, where it runs, how to report to the parent."""

    rank: int
    world_size: int
    device: str  # "cuda" or "cpu"
    backend: str
    control: Any  # a gloo process group for host-side agreement (barriers, flags, small maxima)
    _queue: Any

    @property
    def torch_device(self) -> Any:
        import torch

        return torch.device("cuda", self.rank) if self.device == "cuda" else torch.device("cpu")

    def report(self, message: Any) -> None:
        """Send a picklable message to the parent (rank 0 only; others' messages are dropped)."""
        if self.rank == 0:
            self._queue.put(("message", message))


def launch(
    target: Callable[[RankContext, Any], None],
    payload: Any,
    *,
    world_size: int,
    device: str,
    on_message: Callable[[Any], None],
    timeout_s: float | None = None,
    extra_env: dict[str, str] | None = None,
) -> None:
    """Run `target(ctx, payload)` on `world_size` spawned ranks; feed rank 0's reports to `on_message`.

    `extra_env` is set in each rank before its process group exists (it cannot undo SAFE_ENV).

    `target` must be importable by name (a module-level function): ranks are spawned, not forked,
    so CUDA and the parent's threads never leak into them. A rank that fails stops the others;
    its traceback's last line becomes the raised error."""
    import multiprocessing

    check_world(device, world_size, "launching ranks")
    apply_safe_env()
    backend = backend_for(device)
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    rendezvous = tempfile.mkdtemp(prefix="dooly-ranks-")
    store_path = os.path.join(rendezvous, "store")
    processes = [
        context.Process(
            target=_rank_main,
            args=(rank, world_size, device, backend, store_path, target, payload, messages,
                  {**(extra_env or {}), **SAFE_ENV}),
            name=f"dooly-rank-{rank}",
        )
        for rank in range(world_size)
    ]
    started = time.monotonic()
    previous = _stop_on_sigterm()
    try:
        for process in processes:
            process.start()
        _pump(processes, messages, on_message, started, timeout_s)
    finally:
        for process in processes:
            if process.pid is None:  # never started
                continue
            if process.is_alive():
                process.terminate()
            process.join(timeout=JOIN_GRACE_S)
        messages.close()
        shutil.rmtree(rendezvous, ignore_errors=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _stop_on_sigterm() -> Any:
    """Turn SIGTERM (a `timeout`, a pod eviction) into an exception in the parent, so its
    `finally` stops the ranks instead of leaving them holding GPUs. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum: int, _frame: Any) -> None:
        raise DoolyError(f"stopped by signal {signum} while ranks were running")

    return signal.signal(signal.SIGTERM, stop)


def _pump(processes: list[Any], messages: Any, on_message: Callable[[Any], None], started: float,
          timeout_s: float | None) -> None:
    done_at: float | None = None
    while True:
        try:
            kind, body = messages.get(timeout=POLL_S)
        except queue_module.Empty:
            kind, body = None, None
        if kind == "message":
            on_message(body)
            continue
        if kind == "error":
            raise DoolyError(f"rank {body[0]} failed: {body[1]}")
        if kind == "done":
            done_at = time.monotonic()
        exits = [p.exitcode for p in processes]
        if done_at is not None and all(code is not None for code in exits):
            break
        if done_at is not None and time.monotonic() - done_at > JOIN_GRACE_S:
            log.warning("ranks finished their work but did not exit within %.0f s: stopping them", JOIN_GRACE_S)
            break
        failed = [(i, code) for i, code in enumerate(exits) if code not in (None, 0)]
        if failed:
            _drain(messages, on_message)
            rank, code = failed[0]
            raise DoolyError(f"rank {rank} exited with code {code} before finishing")
        if done_at is None and all(code == 0 for code in exits):
            _drain(messages, on_message)
            return
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            raise DoolyError(f"ranks did not finish within {timeout_s:.0f} s")


def _drain(messages: Any, on_message: Callable[[Any], None]) -> None:
    while True:
        try:
            kind, body = messages.get_nowait()
        except queue_module.Empty:
            return
        if kind == "message":
            on_message(body)


def _rank_main(rank: int, world_size: int, device: str, backend: str, store_path: str,
               target: Callable[[RankContext, Any], None], payload: Any, messages: Any,
               environment: dict[str, str]) -> None:
    """A spawned rank: safe environment first, then the process groups, then the work."""
    os.environ.update(environment)
    import torch
    import torch.distributed as dist

    try:
        store = dist.FileStore(store_path, world_size)
        options: dict[str, Any] = {"timeout": timedelta(seconds=COLLECTIVE_TIMEOUT_S)}
        if device == "cuda":
            torch.cuda.set_device(rank)
            options["device_id"] = torch.device("cuda", rank)
        elif "OMP_NUM_THREADS" not in os.environ:  # CPU ranks share the host's cores: no oversubscription
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size)})
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, **options)
        control = dist.new_group(backend=BACKEND_GLOO) if backend != BACKEND_GLOO else dist.group.WORLD
        context = RankContext(rank, world_size, device, backend, control, messages)
        target(context, payload)
        dist.barrier(group=control)
        if rank == 0:
            messages.put(("done", None))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, then re-raised
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        messages.put(("error", (rank, last[:ERROR_CHARS])))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

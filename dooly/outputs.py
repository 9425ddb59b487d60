"""Checks that an output location (--out, --plot) can be written, made before any work runs.

A simulation or a benchmark that runs for minutes and then dies on an unwritable --out wastes the
run and prints a traceback. These click callbacks check the location when the command line is
parsed: one `error:` line, exit 2, before anything runs, and nothing is created by the check (a
missing directory is made later by the writer; here only its nearest existing ancestor is probed,
with a temporary file that is removed at once). A probe, not os.access: access() says yes to root
on any directory, and knows nothing of read-only mounts' or ACLs' finer points.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import click

from dooly.errors import DoolyError


def _nearest_existing(path: Path) -> Path:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def _probe_directory(directory: Path, option: str, target: Path) -> None:
    if not directory.is_dir():
        raise DoolyError(f"{option} {target}: cannot be created, {directory} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise DoolyError(f"{option} {target}: {directory} is not writable ({reason})") from exc


def check_output_file(path: str | os.PathLike, option: str = "--out") -> Path:
    """A file that can be written: an existing regular file, or a new name in a writable
    directory (possibly one still to be made). Creates nothing."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise DoolyError(f"{option} {target} is a directory; name a file")
    if target.exists():
        if not target.is_file():
            raise DoolyError(f"{option} {target} exists and is not a regular file")
        _probe_directory(target.parent if str(target.parent) else Path("."), option, target)
        return target
    _probe_directory(_nearest_existing(target.absolute().parent), option, target)
    return target


def check_output_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """A directory that can be written: an existing writable one, or one that can be made under
    its nearest existing ancestor. Creates nothing."""
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise DoolyError(f"{option} {target} exists and is not a directory")
    _probe_directory(_nearest_existing(target.absolute()), option, target)
    return target


def writable_file(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """click callback: `value` (if given) is a file this command can write."""
    if value is not None:
        check_output_file(value, _option_name(param))
    return value


def writable_dir(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """click callback: `value` (if given) is a directory this command can write into."""
    if value is not None:
        check_output_dir(value, _option_name(param))
    return value


def _option_name(param: click.Parameter) -> str:
    names = [name for name in getattr(param, "opts", []) if name.startswith("--")]
    return names[0] if names else str(param.name)

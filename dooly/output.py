"""Shared helpers for command output: a human table or one JSON document on stdout."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import click

OUTPUT_OPTION_HELP = "text: a readable summary; json: one JSON document on stdout, for scripts."


def output_option(func):
    """The `--output text|json` option every command carries."""
    return click.option(
        "--output",
        "output_format",
        type=click.Choice(["text", "json"]),
        default="text",
        show_default=True,
        help=OUTPUT_OPTION_HELP,
    )(func)


def emit_json(payload: Any) -> None:
    click.echo(json.dumps(payload, indent=2, sort_keys=True, default=str))


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Plain fixed-width table; right-aligns numbers so columns of figures read well."""
    rendered = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rendered:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rendered:
        lines.append("  ".join(_align(cell, w) for cell, w in zip(row, widths)))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _align(cell: str, width: int) -> str:
    try:
        float(cell.replace("%", ""))
    except ValueError:
        return cell.ljust(width)
    return cell.rjust(width)


def progress(iterable, *, length: int | None = None, label: str = ""):
    """A progress bar on a terminal, nothing otherwise (logs stay quiet in pods and CI)."""
    return click.progressbar(
        iterable,
        length=length,
        label=label,
        file=sys.stderr,
        show_pos=True,
    )

"""`dooly server-costs`: measure the HTTP server's per-request terms from paired runs of one cell."""

from __future__ import annotations

import click

from dooly.output import emit_json, format_table, output_option
from dooly.sim.server_costs import MS_PER_S, measure_server_costs


@click.command("server-costs")
@click.option("--http", "http_dirs", multiple=True, required=True, type=click.Path(file_okay=False, exists=True),
              help="A run of `dooly bench --client http` (repeat the flag: one per workload).")
@click.option("--inprocess", "inprocess_dirs", multiple=True, required=True,
              type=click.Path(file_okay=False, exists=True),
              help="An in-process run of the same cell (repeat the flag; repeats of one workload are averaged).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="Write the dooly.server_costs/1 record here.")
@output_option
def server_costs_command(http_dirs: tuple[str, ...], inprocess_dirs: tuple[str, ...], out_path: str | None,
                         output_format: str) -> None:
    """Measure what the engine's HTTP server adds per request, for `dooly validate --server-costs`.

    Each HTTP run is paired with the in-process runs of the same workload (same requests, same
    settings, same stack); per request, TTFT and TPOT at the HTTP client minus in-process are the
    offsets, and their medians over all pairs the terms. The record keeps their spread, each
    cell's own, and the checks it failed: a negative offset or one that moves with the load is
    not a server cost (docs/engine-paths.md).

    \b
    Example:
      dooly server-costs --http gt/http.light --http gt/http.heavy \\
          --inprocess gt/light --inprocess gt/heavy --out server-costs.json
    """
    costs = measure_server_costs(http_dirs, inprocess_dirs)
    if out_path:
        costs.save(out_path)
        costs.source = out_path
    if output_format == "json":
        emit_json(costs.as_dict())
        return
    rows = [(cell.http, len(cell.inprocess), cell.ttft.n, f"{cell.ttft.median_s * MS_PER_S:+.1f}",
             f"{cell.ttft.p10_s * MS_PER_S:+.1f}..{cell.ttft.p90_s * MS_PER_S:+.1f}",
             f"{cell.tpot.median_s * MS_PER_S:+.2f}",
             f"{cell.tpot.p10_s * MS_PER_S:+.2f}..{cell.tpot.p90_s * MS_PER_S:+.2f}") for cell in costs.cells]
    click.echo(format_table(["HTTP run", "in-process runs", "requests", "TTFT offset (ms)", "p10..p90",
                             "TPOT offset (ms)", "p10..p90"], rows))
    click.echo(f"server costs: {costs.describe()}")

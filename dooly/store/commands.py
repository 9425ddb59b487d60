"""`dooly merge`: compact a store's shards into a new snapshot generation.

Only click is imported at module level: `dooly --help` loads this module, and polars/boto3 are
imported when the command runs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import click

from dooly.output import emit_json, format_table, output_option

STORE_HELP = (
    "The latency database: a directory (./db, /abs/path, file://...) or s3://bucket/prefix."
)
ENDPOINT_HELP = (
    "S3 endpoint URL for S3-compatible servers (default: $DOOLY_S3_ENDPOINT_URL, "
    "$AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL; AWS itself when none is set)."
)
REGION_HELP = "S3 region (default: $AWS_REGION or $AWS_DEFAULT_REGION, else us-east-1)."


def store_options(func: Callable) -> Callable:
    """The --store / --endpoint-url / --region options, shared by every command that opens a store.

    Credentials are never flags (they would land in shell history and pod specs): boto3 reads
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN or AWS_PROFILE.
    """
    func = click.option("--region", default=None, help=REGION_HELP)(func)
    func = click.option("--endpoint-url", default=None, metavar="URL", help=ENDPOINT_HELP)(func)
    return click.option("--store", "store_uri", required=True, metavar="URI", help=STORE_HELP)(func)


@click.command("merge")
@store_options
@click.option(
    "--force",
    is_flag=True,
    help="Write a new generation even when the shards are those of the newest one.",
)
@click.option(
    "--allow-shrink",
    is_flag=True,
    help="Publish a generation with fewer rows than the newest one (shards quarantined or lost); "
    "without it such a merge exits 65 and publishes nothing.",
)
@output_option
def merge_command(
    store_uri: str,
    endpoint_url: str | None,
    region: str | None,
    force: bool,
    allow_shrink: bool,
    output_format: str,
) -> None:
    """Deduplicate every shard of a store into a new snapshot generation.

    Rows measuring the same (platform, engine, backend, dtype, signature, point) keep one winner:
    the newest engine/torch/CUDA versions, then the most samples, then the latest, then the
    greatest run id. Readers (`dooly fit`) always see a whole generation. Unreadable or
    schema-mismatched shards are moved under quarantine/ and listed; the merge goes on, but a
    generation smaller than the newest one is not published (exit 65) unless --allow-shrink.

    \b
    Examples:
      dooly merge --store ./db
      dooly merge --store s3://latency/db --endpoint-url http://127.0.0.1:8333
      AWS_PROFILE=lab dooly merge --store s3://latency/db --output json
    """
    from dooly.store.backends import open_store
    from dooly.store.merge import merge_store

    store = open_store(store_uri, endpoint_url=endpoint_url, region=region, create=False)
    report = merge_store(
        store,
        progress=output_format == "text" and sys.stderr.isatty(),
        force=force,
        allow_shrink=allow_shrink,
    )
    if output_format == "json":
        emit_json({"store": store.uri, **report.to_dict()})
        return
    state = "unchanged (no new shards)" if report.unchanged else "written"
    rows = [
        ("generation", f"{report.generation} ({state})"),
        ("shards consumed", report.shards_consumed),
        ("rows in", report.rows_in),
        ("rows out", report.rows_out),
        ("duplicates dropped", report.duplicates_dropped),
        ("quarantined", len(report.quarantined)),
        ("seconds", round(report.seconds, 2)),
    ]
    click.echo(f"store {store.uri}")
    click.echo(format_table(["merge", "result"], rows))
    for key in report.quarantined:
        click.echo(f"quarantined: {key}")

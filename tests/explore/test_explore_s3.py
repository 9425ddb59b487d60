"""`dooly explore --store s3://... --report`: the answer lands beside the models in the bucket."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from explore_support import FAST, TOY

from dooly.cli import cli

REPORT_FILES = {"explore.json", "explore.txt", "candidates.csv", "capacity.png", "frontier.png"}


def test_report_is_written_to_the_store_generation(two_platform_store, moto_uri):
    from dooly.store.backends import open_store

    bucket = open_store(moto_uri)
    root = Path(two_platform_store)
    for path in root.rglob("*"):
        if path.is_file() and "reports" not in path.parts:
            bucket.put_bytes(path.relative_to(root).as_posix(), path.read_bytes())
    args = ["explore", TOY.model_id, "--store", moto_uri, "--slo", "ttft_p90=0.02", "--slo", "tpot_p90=0.0025",
            "--requests", "40", "--output-len", "16", "--jobs", "1", "--report", "--report-name", "nightly",
            "--output", "json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    prefix = "reports/gen-000001/nightly/"
    assert {key[len(prefix):] for key in bucket.list_keys(prefix)} == REPORT_FILES
    assert sorted(document["files"]) == sorted(f"{moto_uri}/{prefix}{name}" for name in REPORT_FILES)
    stored = json.loads(bucket.get_bytes(prefix + "explore.json"))
    assert stored["best"]["candidate"]["platform"] == FAST and stored["generation"] == 1

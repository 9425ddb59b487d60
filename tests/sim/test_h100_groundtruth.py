"""The committed H100 ground truth re-validated on the CPU: the database the accuracy table was
measured on is merged and fitted here, and `dooly overhead` + `dooly validate` must reproduce the
committed figures (data/h100/validation/accuracy.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from dooly.cli import cli

# The fitted H100 store is built once a run; its users share a pytest-xdist worker (tests/conftest.py).
pytestmark = pytest.mark.xdist_group("fitted-h100")

DATA = Path(__file__).resolve().parents[2] / "data" / "h100"
PLATFORM = "NVIDIA-H100-80GB-HBM3"
# The same code on the same data: only floating-point summation order may differ.
REPRODUCE_TOLERANCE_PP = 0.05
# A cold cell calibrated on its own calib run, and a warm one calibrated on the warm calib run
# recorded on its device lease.
CELLS = [("Llama-3.1-8B", "paged|sdpa", "graphs", "heavy"), ("Llama-3.1-8B", "paged|sdpa", "warm", "heavy")]


@pytest.fixture(scope="module")
def fitted_store(fitted_h100_copy: Path) -> Path:
    return fitted_h100_copy


def _run(args: list[str]) -> dict:
    result = CliRunner().invoke(cli, [*args, "--output", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.parametrize("cell", CELLS, ids=lambda cell: ".".join(cell))
def test_committed_accuracy_cell_is_reproduced(fitted_store, tmp_path, cell):
    short, backend, variant, workload = cell
    prefix = f"{short}.{backend.replace('|', '-')}.{variant}"
    committed = next(
        r for r in json.loads((DATA / "validation" / "accuracy.json").read_text())
        if (r["model"], r["backend"], r["variant"], r["workload"]) == cell
    )
    assert committed["calibration"] == f"{prefix}.calib"
    common = ["--store", str(fitted_store), "--platform", PLATFORM, "--backend", backend]
    overhead = tmp_path / "overhead.json"
    calibration = _run(["overhead", f"meta-llama/{short}", "--ground-truth", str(DATA / "groundtruth" / committed["calibration"]),
                        "--out", str(overhead), *common])
    # A suite model is fully profiled: every phase of the calib run is priced by measured signatures.
    assert calibration["coverage"] and all(c["measured_share"] == pytest.approx(1.0) for c in calibration["coverage"].values())
    report = _run(["validate", f"meta-llama/{short}", "--ground-truth", str(DATA / "groundtruth" / f"{prefix}.{workload}"),
                   "--cpu-overhead", str(overhead), *common])
    assert report["requests"]["ttft"]["n"] == committed["requests"]
    assert report["requests"]["ttft"]["mape"] == pytest.approx(committed["ttft_mape"], abs=REPRODUCE_TOLERANCE_PP)
    assert report["requests"]["tpot"]["mape"] == pytest.approx(committed["tpot_mape"], abs=REPRODUCE_TOLERANCE_PP)
    assert report["steps"]["mape"] == pytest.approx(committed["step_mape"], abs=REPRODUCE_TOLERANCE_PP)
    for metric in ("ttft", "tpot", "e2e"):
        for statistic in ("mean", "p90"):
            reproduced = report["distribution"][metric][statistic]["error_pct"]
            assert reproduced == pytest.approx(committed[f"{metric}_{statistic}_error_pct"], abs=REPRODUCE_TOLERANCE_PP)


def test_every_committed_cell_has_its_ground_truth_and_calibration_run():
    cells = json.loads((DATA / "validation" / "accuracy.json").read_text())
    assert len(cells) >= 12
    for row in cells:
        prefix = f"{row['model']}.{row['backend'].replace('|', '-')}.{row['variant']}"
        for cell in (f"{prefix}.{row['workload']}", row["calibration"]):
            assert (DATA / "groundtruth" / cell / "requests.parquet").is_file()
        # A group with a calib run of its own (recorded beside it) is calibrated on that one.
        if (DATA / "groundtruth" / f"{prefix}.calib" / "requests.parquet").is_file():
            assert row["calibration"] == f"{prefix}.calib"


def test_vidur_export_from_the_fitted_h100_models(fitted_store, tmp_path):
    import csv

    _run(["export", "vidur", "meta-llama/Llama-3.1-8B", "--device", "h100", "--out", str(tmp_path), "--store", str(fitted_store),
          "--platform", PLATFORM, "--backend", "paged|sdpa", "--max-tokens", "512", "--max-seq-len", "1024", "--max-batch-size", "8"])
    base = tmp_path / "data" / "profiling" / "compute" / "h100" / "meta-llama" / "Llama-3.1-8B"
    mlp = list(csv.DictReader((base / "mlp.csv").open()))
    by_tokens = {int(r["num_tokens"]): r for r in mlp}
    for op in ("emb", "input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj", "mlp_up_proj", "mlp_act", "mlp_down_proj", "add"):
        assert float(by_tokens[1][f"time_stats.{op}.median"]) > 0, op
        assert float(by_tokens[512][f"time_stats.{op}.median"]) > float(by_tokens[1][f"time_stats.{op}.median"]), op
    decodes = [r for r in csv.DictReader((base / "attention.csv").open()) if r["is_prefill"] == "False" and r["batch_size"] == "1"]
    by_context = {int(r["kv_cache_size"]): float(r["time_stats.attn_decode.median"]) for r in decodes}
    contexts = sorted(by_context)
    assert by_context[contexts[-1]] > by_context[contexts[0]] > 0


@pytest.mark.slow
def test_committed_calibration_is_rebuilt_from_the_committed_runs_and_used_by_validate(fitted_store):
    """The store carries the platform's calibration (built by `dooly calibrate` from the committed
    calib runs, generation by generation); recording those runs in the store and fitting them again
    gives the newest generation's terms (KV regressors per cache layer group), `--kv-regressors
    tokens` gives the first generation's (KV tokens, before the group form), and `dooly validate`
    without --cpu-overhead says it used the newest."""
    calib_runs = sorted((DATA / "groundtruth").glob("*.paged-sdpa.*.calib"))
    graphs_runs = [str(d) for d in calib_runs if ".default." not in d.name]
    recorded = _run(["calibrate", "--store", str(fitted_store), "--record-only",
                     *(arg for d in graphs_runs for arg in ("--ground-truth", d))])
    assert len(recorded["recorded"]) == len(graphs_runs)
    committed = sorted((DATA / "db" / "calibrations").rglob("backend=paged~7Csdpa/graphs=on/gen-*.json"))
    assert len(committed) >= 2 and committed[0].name == "gen-000001.json"
    tokens = _run(["calibrate", "--store", str(fitted_store), "--from-store", "--dry-run", "--kv-regressors", "tokens"])
    rebuilt = _run(["calibrate", "--store", str(fitted_store), "--from-store"])["calibrations"]
    [graphs] = [c for c in rebuilt if c["key"]["cuda_graphs"]]
    assert graphs["generation"] == len(committed) + 1 and len(graphs["inputs"]) == len(graphs_runs)
    assert graphs["fit"]["kv_regressors"] == "groups"
    [graphs_tokens] = [c for c in tokens["calibrations"] if c["key"]["cuda_graphs"]]
    for fitted, reference in ((graphs_tokens, committed[0]), (graphs, committed[-1])):
        for path, terms in json.loads(reference.read_text())["terms"].items():
            for name, value in terms.items():
                assert fitted["terms"][path][name] == pytest.approx(value, rel=1e-6, abs=1e-12)
    report = _run(["validate", "meta-llama/Llama-3.2-3B", "--ground-truth",
                   str(DATA / "groundtruth" / "Llama-3.2-3B.paged-sdpa.graphs.heavy"),
                   "--store", str(fitted_store), "--platform", PLATFORM, "--backend", "paged|sdpa"])
    assert report["cpu_overhead"].startswith(f"store calibration generation {len(committed) + 1} ")
    assert "graphs on" in report["cpu_overhead"] and "(28 layers)" in report["cpu_overhead"]
    assert report["requests"]["tpot"]["mape"] < 10.0


@pytest.mark.slow
def test_async_calibration_is_rebuilt_by_default_and_the_first_shape_split_is_opt_in(fitted_store):
    """`dooly calibrate` on the committed async calib run reproduces the committed async generation
    (one capture cost over every capture); `--async-captures split` prices captures at shapes the
    engine had run apart from the first run of a new attention shape (docs/calibration.md)."""
    run = DATA / "experiments" / "engine_paths" / "r1" / "Qwen2.5-7B.paged-sdpa.async.calib"
    [committed] = sorted((DATA / "db" / "calibrations").rglob("graphs=on/async=on/gen-*.json"))[-1:]
    reference = json.loads(committed.read_text())
    # A generation that records no KV form was fitted in the KV-token form (the one before the groups).
    kv_form = reference["fit"].get("kv_regressors", "tokens")
    forms = {}
    for form in ("single", "split"):
        [forms[form]] = _run(["calibrate", "--store", str(fitted_store), "--ground-truth", str(run), "--dry-run",
                              "--kv-regressors", kv_form, "--async-captures", form])["calibrations"]
    single, split = forms["single"], forms["split"]
    assert single["key"]["async_batching"] and single["new_shape_eager_s"] == 0.0
    assert single["graph_capture_s"] == pytest.approx(reference["graph_capture_s"], rel=1e-6)
    for path, terms in reference["terms"].items():
        for name, value in terms.items():
            assert single["terms"][path][name] == pytest.approx(value, rel=1e-6, abs=1e-12)
    # The first run of a shape costs far more than a capture at a shape already run.
    assert split["new_shape_eager_s"] > 2 * split["graph_capture_s"] > 0
    assert split["graph_capture_s"] < single["graph_capture_s"]
    assert split["terms"] == single["terms"]

"""What transformers' async batching (`use_async_batching=true`) changes, measured from `dooly bench`
runs with it on and off (docs/calibration.md, "Async batching", quotes the tables).

How the engine runs it (transformers 5.17, continuous_batching/continuous_api.py and
input_outputs.py `ContinuousBatchingAsyncIOs`): two host/device IO buffer pairs used in turn; the
loop is prepare(N+1) -> launch(N+1) -> update(N), so the host prepares and launches batch N+1 while
the device still runs N, and only then waits for N's outputs (`d2h_over.synchronize()`) and hands
its tokens out. Each pair has its own CUDA graphs.

What the bench probe records in that order (dooly/engines/transformers_bench.py `StepProbe`): a
row is written at update time, so row k holds batch k's composition, `prepare_s`, `forward_s`
(the launch) and `device_s` (CUDA events on the compute stream: the start event fires when the
stream has finished batch k-1), and `update_s` of batch k-1 (its wait for the device included);
`duration_s` runs from batch k's prepare to the end of batch k-1's update. The device timeline is
rebuilt from that:

    dev_end[k] = max(dev_end[k-1], start[k] + prepare[k]) + device[k]
    update k-1 waits max(0, dev_end[k-1] - (start[k] + prepare[k] + forward[k])), the rest is work.

A synchronous run's row is one batch: prepare, forward (which waits for the device), update.

    python bench/async_batching.py [--root data/h100/experiments/engine_paths] [--json OUT.json]
    python bench/async_batching.py --ablate STORE   # STORE: fitted, with the async calibration

`--ablate` validates the first async run of each load (the others as repeats, for the floor)
with the simulator's async model whole, then with one part of it taken out at a time: tokens
handed out as soon as the device is done (no wait for the next launch), one IO pair (a shape
captured once), no post-capture device time, no input copy (each launch's host-to-device copy of
its inputs, which the next launch's copy queues behind and the step's device work waits for); and
with all four out (the loop the simulator had before async batching was measured).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUNS = ROOT / "data" / "h100" / "experiments" / "engine_paths"
MODEL_RUN = "Qwen2.5-7B.paged-sdpa"
MS = 1e3
PLATFORM = "NVIDIA-H100-80GB-HBM3"
BACKEND = "paged|sdpa"
MODEL = "Qwen/Qwen2.5-7B"
LOADS = ("light", "heavy")
# name -> (hand tokens out after the next launch, IO pairs, post-capture device time kept, input copy kept)
VARIANTS = {
    "model": (True, 2, True, True),
    "tokens at device end": (False, 2, True, True),
    "one IO pair": (True, 1, True, True),
    "no post-capture stall": (True, 2, False, True),
    "no input copy": (True, 2, True, False),
    "none of the four": (False, 1, False, False),
}
ABLATION_STATS = ("ttft_mean", "ttft_p90", "tpot_mean", "tpot_p90")


def load(directory: Path) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, Any]]:
    steps = pl.read_parquet(directory / "steps.parquet").sort("step")
    requests = pl.read_parquet(directory / "requests.parquet")
    engine = json.loads((directory / "engine.json").read_text())
    return steps, requests, engine


def timeline(steps: pl.DataFrame, asynchronous: bool) -> pl.DataFrame:
    """Per row: when the device ran the row's batch and how long the host held it up."""
    start = steps["start_s"].to_numpy()
    prepare = steps["prepare_s"].to_numpy()
    forward = steps["forward_s"].to_numpy()
    device = steps["device_s"].to_numpy()
    update = steps["update_s"].to_numpy()
    n = len(start)
    dev_start = np.zeros(n)
    dev_end = np.zeros(n)
    wait = np.zeros(n)
    idle = np.zeros(n)
    for k in range(n):
        ready = start[k] + prepare[k]
        previous = dev_end[k - 1] if k else -np.inf
        if asynchronous:
            dev_start[k] = max(previous, ready)
            dev_end[k] = dev_start[k] + device[k]
            launched = ready + forward[k]
            wait[k] = max(0.0, previous - launched) if k else 0.0
        else:
            dev_start[k] = ready
            dev_end[k] = ready + device[k]
            wait[k] = 0.0
        idle[k] = max(0.0, ready - previous) if k else 0.0
    # Host work of a row: prepare + launch + update minus its wait for the device.
    host = prepare + forward + np.maximum(update - wait, 0.0) if asynchronous else steps["duration_s"].to_numpy() - device
    return steps.with_columns(
        pl.Series("dev_start", dev_start), pl.Series("dev_end", dev_end), pl.Series("update_wait", wait),
        pl.Series("update_work", np.maximum(update - wait, 0.0)), pl.Series("device_idle", idle),
        pl.Series("host", host),
        pl.Series("interval", np.append(np.diff(start), np.nan)),
        pl.col("decode_ctx").list.len().alias("num_decode"), pl.col("prefill").list.len().alias("num_prefill"),
    )


def token_lag(steps: pl.DataFrame, requests: pl.DataFrame, asynchronous: bool) -> np.ndarray:
    """Seconds from the end of the device work of the batch that sampled a token to the token's
    timestamp (taken in the engine's update). A batch's tokens are handed out by the row that
    updates it: the same row (sync) or the next one (async)."""
    times = np.sort(np.concatenate([np.asarray(t) for t in requests["token_times_s"].to_list() if t]))
    ends = (steps["start_s"] + steps["duration_s"]).to_numpy()
    dev_end = steps["dev_end"].to_numpy()
    # The row whose update window holds each token: the first row ending at or after it.
    row = np.searchsorted(ends, times - 1e-9)
    row = row[row < len(ends)]
    sampled_by = row - 1 if asynchronous else row
    keep = sampled_by >= 0
    return times[: len(row)][keep] - dev_end[sampled_by[keep]]


def graph_captures(steps: pl.DataFrame) -> dict[str, Any]:
    """Captures, distinct shapes captured, and the device time of the step right after a capture."""
    captured = steps.filter(pl.col("graph_captured"))
    shapes = captured.group_by("engine_path", "padded_tokens").len()
    after = steps.with_columns(pl.col("graph_captured").shift(1).fill_null(False).alias("after_capture"))
    decode = after.filter((pl.col("num_prefill") == 0) & ~pl.col("graph_captured"))
    return {
        "captures": captured.height,
        "shapes": shapes.height,
        "shapes_captured_twice": int((shapes["len"] >= 2).sum()),
        "capture_forward_ms": _median(captured["forward_s"]) * MS,
        "decode_device_ms_after_capture": _median(decode.filter(pl.col("after_capture"))["device_s"]) * MS,
        "decode_device_ms_otherwise": _median(decode.filter(~pl.col("after_capture"))["device_s"]) * MS,
        "decode_after_capture": decode.filter(pl.col("after_capture")).height,
    }


def _median(series: pl.Series) -> float:
    values = series.to_numpy()
    return float(np.median(values)) if len(values) else float("nan")


def run_row(directory: Path) -> dict[str, Any]:
    steps, requests, engine = load(directory)
    asynchronous = bool(engine.get("use_async_batching"))
    line = timeline(steps, asynchronous)
    steady = line.filter(~pl.col("graph_captured") & ~pl.col("graph_captured").shift(1).fill_null(False))
    decode = steady.filter(pl.col("num_prefill") == 0)
    span = float(np.max(line["dev_end"].to_numpy()) - np.min(line["start_s"].to_numpy()))
    lag = token_lag(line, requests, asynchronous)
    ttft = (requests["first_token_s"] - requests["arrived_at_s"]).to_numpy()
    tokens = [np.diff(t) for t in requests["token_times_s"].to_list() if len(t) > 1]
    gaps = np.concatenate(tokens) if tokens else np.array([])
    return {
        "run": f"{directory.parent.name}/{directory.name.removeprefix(MODEL_RUN + '.')}",
        "async": asynchronous,
        "steps": line.height,
        "device_busy_pct": 100 * float(np.sum(line["device_s"].to_numpy())) / span,
        "decode_interval_ms": _median(decode["interval"].drop_nans()) * MS,
        "decode_device_ms": _median(decode["device_s"]) * MS,
        "decode_host_ms": _median(decode["host"]) * MS,
        "decode_prepare_ms": _median(decode["prepare_s"]) * MS,
        "decode_launch_ms": _median(decode["forward_s"]) * MS if asynchronous else float("nan"),
        "update_work_ms": _median(steady["update_work"]) * MS if asynchronous else _median(steady["update_s"]) * MS,
        "device_waits_for_host_pct": 100 * float(np.mean(steady["device_idle"].to_numpy() > 0)),
        "device_idle_ms_when_waiting": _median(steady.filter(pl.col("device_idle") > 0)["device_idle"]) * MS,
        "token_lag_ms_p50": float(np.median(lag)) * MS if len(lag) else float("nan"),
        "token_lag_ms_p90": float(np.percentile(lag, 90)) * MS if len(lag) else float("nan"),
        "token_lag_negative": int((lag < -1e-4).sum()),
        "ttft_ms_mean": float(np.mean(ttft)) * MS,
        "gap_ms_p50": float(np.median(gaps)) * MS if len(gaps) else float("nan"),
        **graph_captures(line),
    }


COLUMNS = (
    ("run", "run", "{}"), ("steps", "steps", "{}"), ("busy %", "device_busy_pct", "{:.1f}"),
    ("decode interval", "decode_interval_ms", "{:.2f}"), ("decode device", "decode_device_ms", "{:.2f}"),
    ("decode host", "decode_host_ms", "{:.2f}"), ("update work", "update_work_ms", "{:.2f}"),
    ("dev waits %", "device_waits_for_host_pct", "{:.0f}"), ("token lag p50", "token_lag_ms_p50", "{:.2f}"),
    ("token lag p90", "token_lag_ms_p90", "{:.2f}"), ("captures", "captures", "{}"), ("shapes", "shapes", "{}"),
    ("x2", "shapes_captured_twice", "{}"), ("capture fwd", "capture_forward_ms", "{:.0f}"),
    ("dec dev after capture", "decode_device_ms_after_capture", "{:.1f}"),
    ("mean TTFT", "ttft_ms_mean", "{:.0f}"), ("gap p50", "gap_ms_p50", "{:.2f}"),
)


def markdown(rows: list[dict[str, Any]]) -> str:
    header = "| " + " | ".join(name for name, _, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" if key == "run" else "---:" for _, key, _ in COLUMNS) + "|"
    body = ["| " + " | ".join(fmt.format(row[key]) for _, key, fmt in COLUMNS) + " |" for row in rows]
    return "\n".join([header, rule, *body])


def ablate(root: Path, store: str) -> list[dict[str, Any]]:
    """The async cells validated with each part of the async model taken out (see the docstring)."""
    from dataclasses import replace

    from dooly.fit.source import FittedSource, open_fitted_step
    from dooly.sim.calibration import find_calibration
    from dooly.sim.calibration_commands import model_layers
    from dooly.sim.options import with_model_groups
    from dooly.sim.schedulers import make_scheduler
    from dooly.sim.validate import load_ground_truth, validate
    from dooly.store.backends import open_store

    calibration = find_calibration(open_store(store, create=False), platform=PLATFORM, engine="transformers",
                                   backend=BACKEND, cuda_graphs=True, async_batching=True)
    if calibration is None:
        raise SystemExit(f"{store} holds no async-batching calibration for {PLATFORM} / {BACKEND}")
    fitted = open_fitted_step(FittedSource(store=store, platform=PLATFORM, backend=BACKEND), MODEL)
    overhead = calibration.for_model(model_layers(MODEL, fitted.inventory), MODEL)
    rows = []
    for load_name in LOADS:
        runs = sorted(root.glob(f"r*/{MODEL_RUN}.async.{load_name}"))
        truths = [load_ground_truth(d) for d in runs]
        settings = json.loads((runs[0] / "engine.json").read_text())
        for name, (after_launch, pairs, stall, copy) in VARIANTS.items():
            scheduler = make_scheduler("transformers", with_model_groups(MODEL, "transformers", settings))
            scheduler.async_handoff_after_launch = after_launch
            scheduler.async_io_pairs = pairs
            variant = replace(overhead, post_capture_device_s=overhead.post_capture_device_s if stall else 0.0,
                              input_copy_s=overhead.input_copy_s if copy else 0.0)
            report = validate(truths[0], scheduler, fitted.step, variant, repeats=truths[1:])
            summary = {row.statistic: row.error_pct for row in report.summary_rows()}
            rows.append({"load": load_name, "variant": name, **{stat: summary[stat] for stat in ABLATION_STATS},
                         "ttft_mape": float(report.requests.ttft.ape.mean()),
                         "tpot_mape": float(report.requests.tpot.ape.mean())})
    return rows


def ablation_markdown(rows: list[dict[str, Any]]) -> str:
    header = ("| load | variant | TTFT mean | TTFT p90 | TPOT mean | TPOT p90 | TTFT MAPE | TPOT MAPE |\n"
              "|---|---|---:|---:|---:|---:|---:|---:|")
    body = [f"| {r['load']} | {r['variant']} | " + " | ".join(f"{r[s]:+.1f}%" for s in ABLATION_STATS)
            + f" | {r['ttft_mape']:.1f}% | {r['tpot_mape']:.1f}% |" for r in rows]
    return "\n".join([header, *body])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_RUNS)
    parser.add_argument("--json", type=Path, help="also write every row as JSON here")
    parser.add_argument("--ablate", metavar="STORE", help="validate the async cells with parts of the model taken out")
    args = parser.parse_args()
    if args.ablate:
        rows = ablate(args.root, args.ablate)
        print(ablation_markdown(rows))
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1) + "\n")
        return
    directories = sorted(d for d in args.root.glob(f"r*/{MODEL_RUN}.*") if (d / "steps.parquet").is_file()
                         and d.name.split(".")[-2] in ("async", "graphs"))
    directories.sort(key=lambda d: (d.name.split(".")[-1], d.name.split(".")[-2], d.parent.name))
    rows = [run_row(d) for d in directories]
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

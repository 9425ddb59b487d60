"""Benchmark: `dooly explore` against the naive loop of one `dooly simulate` process per candidate
and rate.

The search: Llama-3.1-8B over 2 platforms (H100, H200) x 3 backends (paged|sdpa, paged|eager,
paged|flex_attention) x 4 engine settings (num_blocks 512/1024 x max_batch_tokens 512/2048) x 2 TP
degrees (1, 2) = 48 candidates, SLO ttft_p90 <= 0.5 s and tpot_p90 <= 0.05 s, the default workload
(100 requests, 512-token prompts, 128-token outputs, Poisson).

No committed store holds all of that, so the benchmark builds a MERGED store (in a temporary
directory unless --store-dir is given) from fitted copies of the committed stores: data/h100/db and
data/h200/db are copied under --work-dir (default: dooly-bench-explore in the OS temp dir),
`dooly merge` + `dooly fit` once (the H100 fit takes minutes), and the copies are reused while the
committed stores are unchanged (a digest of their files is kept beside each copy):
- the fitted H100 store (paged|sdpa, paged|eager, paged|flex_attention) and the fitted H200 store
  (paged|sdpa, paged|eager; Mixtral only, so Llama-3.1-8B on the H200 is an unseen model, traced
  on the CPU and predicted from class models: its coverage column says so) side by side in one
  generation, with both stores' host-overhead calibrations; H200 has no paged|flex_attention group
  and neither store a calibration of paged|flex_attention, so those 16 candidates are listed as
  unpredictable, as explore lists any candidate the store cannot predict;
- SYNTHETIC collectives per platform (all_reduce and all_gather on a ring law, fitted as the fit
  stage fits measured ones; neither store holds measured collectives) and the committed tp2 traces
  of Llama-3.1-8B (data/traces/Llama-3.1-8B.tp2.paged-{sdpa,eager,flex_attention}.json, made with
  `dooly trace meta-llama/Llama-3.1-8B --tp 2 --attention B --out F`) as its tp2 inventories.
Host overhead: each store's calibration per platform and backend (graphs off: the settings leave
use_cuda_graph at its default), as explore and simulate pick them by default.

The naive loop runs `python -m dooly.cli simulate` once per (candidate, rate) that the search
evaluated (the saturation run as `--arrival burst`); by default it times a subset of
--naive-runs processes and extrapolates by the count of simulations, with 2 processes at a time
on 2 cores (the same parallelism explore gets).

    python bench/bench_explore.py                     # build the store, time both, print the table
    python bench/bench_explore.py --naive-runs 0      # explore only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# The committed stores the benchmark fits copies of (name under the work dir -> source).
SOURCES = {"h100": ROOT / "data/h100/db", "h200": ROOT / "data/h200/db"}
WORK_DIR_NAME = "dooly-bench-explore"
DIGEST_FILE = ".bench-source-digest"
FIT_TIMEOUT_S = 1800
TP_TRACES = [ROOT / f"data/traces/Llama-3.1-8B.tp2.paged-{b}.json" for b in ("sdpa", "eager", "flex_attention")]
MODEL = "meta-llama/Llama-3.1-8B"
SLOS = ("ttft_p90=0.5", "tpot_p90=0.05")
SETTINGS = ("num_blocks=512,1024", "max_batch_tokens=512,2048")
TP = "1,2"
JOBS = 2
TARGET_S = 60.0
TARGET_SPEEDUP = 10.0
DEFAULT_NAIVE_RUNS = 12
# Synthetic ring collectives (the law of tests/fit/test_fit_collectives.py), per platform.
RING = {"NVIDIA-H100-80GB-HBM3": (300e9, 6e-6), "NVIDIA-H200": (350e9, 6e-6)}
COLLECTIVE_LAUNCH_S = 4e-6
INTERCONNECT = "NV18"
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
SHAPES = ((1024, 2), (4096, 2), (8192, 2), (2048, 4), (8192, 4), (32000, 2), (64128, 2), (128256, 4))


def ring_seconds(tokens: np.ndarray, width: int, ranks: int, kind: str, bandwidth: float, hop: float) -> np.ndarray:
    factor = 2.0 * (ranks - 1) / ranks if kind == "all_reduce" else float(ranks - 1)
    hops = 2 * (ranks - 1) if kind == "all_reduce" else ranks - 1
    return COLLECTIVE_LAUNCH_S + hops * hop + factor * tokens * width * 2 / bandwidth


def collective_frame(platform: str):
    import polars as pl

    bandwidth, hop = RING[platform]
    rows = []
    for kind, var in (("all_reduce", "T"), ("all_gather", "B")):
        op = f"collective.{kind}"
        for width, ranks in SHAPES:
            config = {"in0.0": 1, "in0.2": width, "world_size": ranks}
            seconds = ring_seconds(np.array(TOKENS, dtype=float), width, ranks, kind, bandwidth, hop)
            for tokens, value in zip(TOKENS, seconds, strict=True):
                rows.append({
                    "platform": platform, "engine": "nccl", "backend": INTERCONNECT, "dtype": "bfloat16",
                    "signature": f"{kind}-{width}-{ranks}", "op": op, "op_class": op,
                    "config_dims": json.dumps(config), "request_vars": json.dumps([var]),
                    "T": tokens if var == "T" else 0, "B": tokens if var == "B" else 0, "K": 0, "D": 0,
                    "point_key": json.dumps({var: tokens}), "latency_median_s": float(value), "status": "ok",
                })
    return pl.DataFrame(rows)


def source_digest(source: Path) -> str:
    """What a fitted copy was made from: every file of the committed store, by path and content."""
    digest = hashlib.sha256()
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(source)).encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def fitted_copy(name: str, source: Path, work_dir: Path) -> Path:
    """A merged and fitted copy of SOURCE under WORK_DIR, made once and reused while SOURCE's files
    are unchanged (fitting the H100 store takes minutes; the committed stores carry no fitted
    models)."""
    target = work_dir / name
    digest = source_digest(source)
    marker = target / DIGEST_FILE
    if marker.is_file() and marker.read_text().strip() == digest:
        return target
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for stage in ("merge", "fit"):
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "dooly.cli", stage, "--store", str(target)], env=env,
                              capture_output=True, text=True, timeout=FIT_TIMEOUT_S)
        if done.returncode != 0:
            raise SystemExit(f"dooly {stage} --store {target} failed: {done.stderr.strip()[-500:]}")
        print(f"{name}: dooly {stage} in {time.perf_counter() - t0:.0f} s")
    marker.write_text(digest + "\n")
    return target


def build_store(root: Path, work_dir: Path) -> str:
    """The merged H100 + H200 store with synthetic collectives and the tp2 inventory."""
    from dooly.fit.persist import serialize_group
    from dooly.fit.selection import fit_frame
    from dooly.profile.run import inventory, inventory_key
    from dooly.trace.schema import Trace

    h100, h200 = (fitted_copy(name, source, work_dir) for name, source in SOURCES.items())
    if root.exists():
        shutil.rmtree(root)
    for source in (h100, h200):
        for part in ("inventories", "models", "calibrations"):
            shutil.copytree(source / part, root / part, dirs_exist_ok=True)
    shutil.copy(h100 / "dooly-store.json", root / "dooly-store.json")
    generation = root / "models" / "gen-000001"
    metas = [json.loads((s / "models" / "gen-000001" / "meta.json").read_text()) for s in (h100, h200)]
    meta = metas[0]
    meta["groups"] = metas[0]["groups"] + metas[1]["groups"]
    meta["inventories"] = sorted(set(metas[0]["inventories"]) | set(metas[1]["inventories"]))
    for platform in RING:
        models, _ = fit_frame(collective_frame(platform), generation=1, folds=3)
        for key, group in models.items():
            name = f"models/gen-000001/{platform}__nccl__{INTERCONNECT}__bfloat16-synthetic.json"
            (root / name).write_bytes(serialize_group(group))
            meta["groups"].append({"platform": key[0], "engine": key[1], "backend": key[2], "dtype": key[3], "key": name,
                                   "classes": []})
    (generation / "meta.json").write_text(json.dumps(meta, indent=2))
    for path in TP_TRACES:
        trace = Trace.from_dict(json.loads(path.read_text()))
        target = root / inventory_key(trace.model_key, trace.backend, trace.tp)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(inventory(trace), indent=2))
    return str(root)


def explore_args(store: str) -> list[str]:
    args = [MODEL, "--store", store, "--tp", TP, "--jobs", str(JOBS), "--output", "json"]
    for platform in RING:
        args += ["--platform", platform]
    for backend in ("paged|sdpa", "paged|eager", "paged|flex_attention"):
        args += ["--backend", backend]
    for slo in SLOS:
        args += ["--slo", slo]
    for setting in SETTINGS:
        args += ["--set", setting]
    return args


def naive_commands(store: str, document: dict) -> list[list[str]]:
    """One `dooly simulate` per (candidate, rate) the search evaluated, plus its saturation run."""
    commands = []
    for result in document["candidates"]:
        c = result["candidate"]
        base = [sys.executable, "-m", "dooly.cli", "simulate", MODEL, "--store", store, "--platform", c["platform"],
                "--backend", c["backend"], "--tp", str(c["tp"]), "--output", "json"]
        for key, value in c["settings"].items():
            base += ["--set", f"{key}={json.dumps(value)}"]
        commands.append([*base, "--arrival", "burst"])
        commands += [[*base, "--rate", repr(p["rate_rps"])] for p in result.get("points", [])]
    return commands


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_naive(commands: list[list[str]], parallel: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    running: list[subprocess.Popen] = []
    for command in commands:
        while len(running) >= parallel:
            running.pop(0).wait()
        running.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for process in running:
        if process.wait() != 0:
            raise SystemExit(f"naive simulate failed: {' '.join(command)}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store-dir", type=Path, help="Build the merged store here (default: a temporary directory).")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / WORK_DIR_NAME,
                        help="Keep the fitted copies of the committed stores here, reused across runs "
                             "[default: %(default)s].")
    parser.add_argument("--naive-runs", type=int, default=DEFAULT_NAIVE_RUNS,
                        help="Time this many naive simulate processes and extrapolate (0: skip; -1: all).")
    parser.add_argument("--out", type=Path, help="Also write explore's files here.")
    args = parser.parse_args()
    tmp = None if args.store_dir else Path(tempfile.mkdtemp(prefix="bench-explore-"))
    root: Path = args.store_dir if tmp is None else tmp / "db"
    try:
        t0 = time.perf_counter()
        store = build_store(root, args.work_dir)
        print(f"merged store built in {time.perf_counter() - t0:.1f} s: {store}")
        command = [sys.executable, "-m", "dooly.cli", "explore", *explore_args(store)]
        if args.out:
            command += ["--out", str(args.out)]
        start, cpu0 = time.perf_counter(), children_cpu_s()
        done = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
        explore_s, explore_cpu = time.perf_counter() - start, children_cpu_s() - cpu0
        if done.returncode != 0:
            raise SystemExit(f"explore failed: {done.stderr.strip()}")
        document = json.loads(done.stdout)
        searched = len(document["candidates"])
        simulations = document["search"]["simulations"]
        print(f"explore: {searched} candidates searched, {len(document['unpredictable'])} unpredictable, "
              f"{simulations} simulations in {explore_s:.1f} s wall, {explore_cpu:.1f} CPU-s "
              f"(jobs={JOBS}; target < {TARGET_S:.0f} s; load average {os.getloadavg()[0]:.1f}); "
              f"step memo {document['search']['step_memo_hits']} hits / {document['search']['step_memo_misses']} misses")
        best = document["best"]
        print(f"best: {best['label'] if best else 'none'}")
        if args.naive_runs:
            commands = naive_commands(store, document)
            subset = commands if args.naive_runs < 0 else commands[:: max(len(commands) // args.naive_runs, 1)][: args.naive_runs]
            cpu0 = children_cpu_s()
            naive_s = run_naive(subset, JOBS)
            naive_cpu = (children_cpu_s() - cpu0) / len(subset) * len(commands)
            per_run = naive_s / len(subset)
            total = per_run * len(commands)
            extrapolated = "" if len(subset) == len(commands) else f" (timed {len(subset)}, extrapolated by count)"
            print(f"naive loop: {len(commands)} simulate processes, {JOBS} at a time: {total:.0f} s{extrapolated}; "
                  f"{per_run:.2f} s per process; {naive_cpu:.0f} CPU-s")
            print(f"speed-up: {total / explore_s:.1f}x wall, {naive_cpu / explore_cpu:.1f}x CPU "
                  f"(target >= {TARGET_SPEEDUP:.0f}x)")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

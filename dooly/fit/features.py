"""Regression features: from (operation class, config-fixed dims, request point) to numbers.

Every feature is a *term* of the request (a request variable, a product of two, or an attention
aggregate such as the number of causal query-key pairs) multiplied by a *static* factor that only
depends on the operation's config-fixed dims (FLOPs per token, bytes per token, heads x head_dim).
Written that way, a model linear in the features collapses, for one operation, into a handful of
coefficients over the request terms: the step predictor then needs no feature construction at all
in its hot loop, and a signature never profiled gets its coefficients from its config dims.

Everything here is vectorised over many rows (points) at once; nothing imports scikit-learn.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np

from dooly.errors import DoolyError

# Request variables an operation can depend on. T, B, K, D are shard columns; S (KV tokens read by
# sliding-window layers) comes from the point itself or the batch composition.
REQUEST_VARS = ("T", "B", "K", "D", "S")
PAIR_TERMS = tuple(f"{a}*{b}" for a, b in combinations(REQUEST_VARS, 2))
# Attention aggregates that need the per-sequence structure, not just the sums.
ATTENTION_TERMS = ("attn_pairs", "padded", "waves_kv")
# Attention that materialises the scores multiplies over the KV tokens it reads in cuBLAS GEMMs,
# whose kernels need that length aligned (profile.grid.UNALIGNED_KV: on the H100 an odd length
# runs ~3.3x slower GEMMs, one of 2 or 4 mod 8 ~1.7x): the (query, key) pairs T x S of a step whose
# KV length is odd, and of one that is even but not a multiple of KV_ALIGNMENT, each a term the
# dense model prices on its own (0 where the length is aligned); beside them the KV length S of
# such steps, since a few queries' GEMM (decodes) is bound by reading the keys, not by the pairs.
KV_ALIGNMENT_TERMS = ("pairs_odd_kv", "pairs_unaligned_kv", "odd_kv", "unaligned_kv")
KV_ALIGNMENT = 8
TERMS = ("zero", "const", *REQUEST_VARS, *PAIR_TERMS, *ATTENTION_TERMS, *KV_ALIGNMENT_TERMS)
TERM_INDEX = {name: i for i, name in enumerate(TERMS)}
N_TERMS = len(TERMS)

FAMILY_ATTENTION = "attention"
FAMILY_MATMUL = "matmul"
FAMILY_GENERIC = "generic"
FAMILY_COLLECTIVE = "collective"
ATTENTION_PREFIX = "attention"
COLLECTIVE_PREFIX = "collective."
WORLD_SIZE = "world_size"
# Bytes each rank moves over the links per element of its input, ring algorithm (NCCL's busBw
# factors): an all_reduce sends 2(n-1)/n of its buffer, an all_gather (n-1) times its share, a
# reduce_scatter (n-1)/n of its input, a pipeline send/recv the whole tensor once.
COLLECTIVE_BUS_FACTORS = {
    "all_reduce": lambda n: 2.0 * (n - 1) / n,
    "all_gather": lambda n: float(n - 1),
    "reduce_scatter": lambda n: (n - 1) / n,
    "send_recv": lambda n: 1.0,
}

# Matrix-product overloads: (index of the left operand, index of the right operand, rank).
MATMUL_OPS: dict[str, tuple[int, int, int]] = {
    "aten.mm.default": (0, 1, 2),
    "aten.addmm.default": (1, 2, 2),
    "aten.bmm.default": (0, 1, 3),
    "aten.baddbmm.default": (1, 2, 3),
}

# Attention config fields. The engine's attention call receives query [1, heads, T, head_dim]
# and key/value [1, kv_heads, K, head_dim], so the traced config dims name them by position;
# named fields, where a tracer records them, take precedence.
NUM_HEADS = "num_heads"
NUM_KV_HEADS = "num_kv_heads"
HEAD_DIM = "head_dim"
SLIDING_WINDOW = "sliding_window"
ATTENTION_FIELD_SOURCES = {
    NUM_HEADS: (NUM_HEADS, "in0.1"),
    HEAD_DIM: (HEAD_DIM, "in0.3"),
    NUM_KV_HEADS: (NUM_KV_HEADS, "in1.1"),
}

# Physical features per family: (name, term kind). "R" stands for the product of the operation's
# request variables (T for a projection, T*K for a [T, K] mask), resolved per signature.
MATMUL_FEATURES = ("launch", "flops", "bytes_request", "bytes_static")
ATTENTION_FEATURES = (
    "launch",
    "per_seq",
    "per_decode",
    "q_elems",
    "kv_elems",
    "window_kv_elems",
    "causal_flops",
    "dense_flops",
    "dense_mask",
    "padded_flops",
    "wave_flops",
    "head_pairs",
    "head_dense",
    "head_padded",
)
GENERIC_FEATURES = (
    "launch",
    "static_elems",
    *(f"{v}_{suffix}" for v in REQUEST_VARS for suffix in ("count", "elems", "max_elems")),
    "pair_max_elems",
)
# Collectives: a launch, a per-hop latency (n-1 steps of a ring), link bytes, local bytes.
COLLECTIVE_FEATURES = ("launch", "hops", "bus_elems", "elems")
FAMILY_FEATURES = {
    FAMILY_COLLECTIVE: COLLECTIVE_FEATURES,
    FAMILY_MATMUL: MATMUL_FEATURES,
    FAMILY_ATTENTION: ATTENTION_FEATURES,
    FAMILY_GENERIC: GENERIC_FEATURES,
}

# Local (one-signature) linear models: which request terms they use.
LOCAL_ATTENTION_TERMS = ("const", "T", "B", "D", "K", "S", "attn_pairs", "T*K", "padded", "waves_kv")

# Wave quantisation of a packed, dense-mask attention call (transformers' paged sdpa and eager run
# the whole batch as one query of T rows against K keys). cuDNN's sm90 flash forward behaves as if
# each thread block took QUERY_TILE query rows of one head and the GPU ran one block per SM at a
# time: a call takes ceil(ceil(T / QUERY_TILE) x heads / SMs) waves, each as long as one block's
# pass over the keys (on the H100 this law fits the large grid points of 7 of 10 attention
# signatures within 1-2.3%, 64- or 256-row tiles fit worse). T=2048 fills 4 waves of Llama-3.1-8B's
# 32 heads and T=2080 needs 5: a chunk of 2048 tokens plus 32 decodes costs 23% more per (query,
# key) pair than 2048 tokens (bench/attention_engine_padding.py); T x K alone cannot say so.
QUERY_TILE = 128
# Wave counts are ratios of integers; this keeps an exact multiple from rounding up.
WAVE_ROUNDING = 1e-9
# Streaming multiprocessors of the platforms Dooly knows (names as `normalise_platform` writes
# them). On any other platform `waves_kv` degrades to T x S / QUERY_TILE: no quantisation.
SM_COUNTS = {
    "NVIDIA-H100-80GB-HBM3": 132,
    "NVIDIA-H100-PCIe": 114,
    "NVIDIA-H100-NVL": 132,
    "NVIDIA-H200": 132,
    "NVIDIA-A100-SXM4-80GB": 108,
    "NVIDIA-A100-SXM4-40GB": 108,
    "NVIDIA-A100-80GB-PCIe": 108,
    "NVIDIA-L40S": 142,
    "NVIDIA-L4": 58,
    "NVIDIA-A10G": 80,
}


def sm_count(platform: str) -> int:
    """Streaming multiprocessors of a platform, 0 when unknown (see SM_COUNTS)."""
    return SM_COUNTS.get(platform, 0)
# A request dim in a signature's input shape: "T", or an integer factor times it ("8*T").
_SCALED_VAR = re.compile(r"^(?:(\d+)\*)?([A-Z])$")


def family_of(op_class: str, op: str = "") -> str:
    """Which physical model applies: attention, a matrix product, or a generic (memory-bound) op."""
    if op_class.startswith(ATTENTION_PREFIX) or op == ATTENTION_PREFIX:
        return FAMILY_ATTENTION
    if op_class.startswith(COLLECTIVE_PREFIX):
        return FAMILY_COLLECTIVE
    if (op or op_class) in MATMUL_OPS:
        return FAMILY_MATMUL
    return FAMILY_GENERIC


def product_term(request_vars: Sequence[str]) -> str:
    """The term standing for the product of an operation's request variables ("zero" if none fits)."""
    ordered = [v for v in REQUEST_VARS if v in request_vars]
    if len(ordered) == 1:
        return ordered[0]
    if len(ordered) == 2:
        return f"{ordered[0]}*{ordered[1]}"
    return "const" if not ordered else "zero"


def check_request_vars(request_vars: Sequence[str], where: str) -> None:
    unknown = [v for v in request_vars if v not in REQUEST_VARS]
    if unknown:
        raise DoolyError(f"{where}: unknown request variable(s) {unknown}; known: {list(REQUEST_VARS)}")


@dataclass(frozen=True)
class StaticFeatures:
    """What one signature contributes to its features: a term index and a factor per feature."""

    term_index: np.ndarray  # int, one per physical feature of the family
    multiplier: np.ndarray  # float, one per physical feature
    window: int  # attention sliding window (0 = none), needed to build its request terms
    # Query tiles one wave of the attention kernel covers (SMs / heads); 0 = not quantised.
    wave_tiles: float = 0.0


def static_features(
    family: str, op: str, config_dims: Mapping[str, int], request_vars: Sequence[str], sms: int = 0
) -> StaticFeatures:
    """The static part of the physical features of one signature (see module docstring); `sms`
    is the platform's SM count, which sets an attention op's wave size (0: unknown)."""
    if family == FAMILY_MATMUL:
        pairs = _matmul_static(op, config_dims, request_vars)
    elif family == FAMILY_ATTENTION:
        pairs = _attention_static(config_dims)
    elif family == FAMILY_COLLECTIVE:
        pairs = _collective_static(op, config_dims, request_vars)
    else:
        pairs = _generic_static(config_dims, request_vars)
    names, factors = zip(*pairs, strict=True)
    window = int(config_dims.get(SLIDING_WINDOW, 0) or 0) if family == FAMILY_ATTENTION else 0
    heads = attention_field(config_dims, NUM_HEADS) if family == FAMILY_ATTENTION else None
    return StaticFeatures(
        term_index=np.array([TERM_INDEX[n] for n in names], dtype=np.int64),
        multiplier=np.array(factors, dtype=np.float64),
        window=max(window, 0),
        wave_tiles=sms / heads if sms > 0 and heads else 0.0,
    )


def _matmul_static(op: str, cfg: Mapping[str, int], request_vars: Sequence[str]) -> list[tuple[str, float]]:
    left, right, rank = MATMUL_OPS[op]
    # Each of batch, m, k, n is a config value or request-derived (None); the product of all
    # request-derived factors is the operation's request product R.
    batch = cfg.get(f"in{left}.0", cfg.get(f"in{right}.0")) if rank == 3 else 1
    m = cfg.get(f"in{left}.{rank - 2}")
    k = cfg.get(f"in{left}.{rank - 1}", cfg.get(f"in{right}.{rank - 2}"))
    n = cfg.get(f"in{right}.{rank - 1}")
    factors = {"b": batch, "m": m, "k": k, "n": n}
    request_term = product_term(request_vars)
    any_request = any(v is None for v in factors.values())
    static = {name: float(v) if v is not None else 1.0 for name, v in factors.items()}
    flops_term = request_term if any_request else "const"
    flops = static["b"] * static["m"] * static["k"] * static["n"]
    bytes_request = 0.0
    bytes_static = 0.0
    for a, b in (("m", "k"), ("k", "n"), ("m", "n")):
        size = static["b"] * static[a] * static[b]
        if factors[a] is None or factors[b] is None:
            bytes_request += size
        else:
            bytes_static += size
    return [
        ("const", 1.0),
        (flops_term, flops),
        (request_term if any_request else "zero", bytes_request),
        ("const", bytes_static),
    ]


def attention_field(cfg: Mapping[str, int], name: str) -> int | None:
    """heads, kv heads or head_dim of an attention op, by name or by position (see above)."""
    for source in ATTENTION_FIELD_SOURCES[name]:
        value = cfg.get(source)
        if value:
            return int(value)
    return None


def _attention_static(cfg: Mapping[str, int]) -> list[tuple[str, float]]:
    heads = float(attention_field(cfg, NUM_HEADS) or 1)
    kv_heads = float(attention_field(cfg, NUM_KV_HEADS) or heads)
    head_dim = float(attention_field(cfg, HEAD_DIM) or 1)
    q_width = heads * head_dim
    kv_width = kv_heads * head_dim
    return [
        ("const", 1.0),
        ("B", 1.0),
        ("D", 1.0),
        ("T", q_width),
        ("K", kv_width),
        ("S", kv_width),
        ("attn_pairs", q_width),
        ("T*K", q_width),
        ("T*K", 1.0),
        ("padded", q_width),
        ("waves_kv", head_dim * QUERY_TILE),
        # Score elements, one per head and (query, key) pair, whatever the head_dim: attention that
        # materialises the scores (eager) masks, softmaxes and casts a [heads, T, K] tensor, so a
        # layout of many narrow heads (32 x 64) costs more than its heads x head_dim says. Without
        # them the eager class regressor missed Llama-3.2-1B's attention, held out, by -30% to -42%
        # (bench/lomo_unseen.py, docs/unseen.md).
        ("attn_pairs", heads),
        ("T*K", heads),
        ("padded", heads),
    ]


def _collective_static(op: str, cfg: Mapping[str, int], request_vars: Sequence[str]) -> list[tuple[str, float]]:
    """A collective's time ~ launch + hops x per-hop latency + link bytes / bandwidth: the
    request product R (tokens or sequences) times the elements per unit of R, scaled by the
    kind's bus factor for the link term."""
    ranks = max(int(cfg.get(WORLD_SIZE, 1) or 1), 1)
    elems = 1.0
    for name, value in cfg.items():
        if name.startswith("in0."):
            elems *= float(max(int(value), 1))
    kind = op.removeprefix(COLLECTIVE_PREFIX)
    factor = COLLECTIVE_BUS_FACTORS.get(kind, COLLECTIVE_BUS_FACTORS["all_reduce"])(ranks)
    term = product_term(request_vars)
    if term == "zero":
        term = "const"
    return [("const", 1.0), ("const", float(ranks - 1)), (term, elems * factor), (term, elems)]


def _input_sizes(cfg: Mapping[str, int]) -> list[float]:
    """Elements per unit of request of each input: the product of its config-fixed dims."""
    groups: dict[str, float] = {}
    for name, value in cfg.items():
        if name == SLIDING_WINDOW:
            continue
        prefix = name.split(".", 1)[0] if name.startswith("in") and "." in name else name
        groups[prefix] = groups.get(prefix, 1.0) * float(max(int(value), 1))
    return list(groups.values())


def _generic_static(cfg: Mapping[str, int], request_vars: Sequence[str]) -> list[tuple[str, float]]:
    sizes = _input_sizes(cfg)
    total = float(sum(sizes)) if sizes else 1.0
    largest = float(max(sizes)) if sizes else 1.0
    pairs: list[tuple[str, float]] = [("const", 1.0), ("const", total)]
    for var in REQUEST_VARS:
        term = var if var in request_vars else "zero"
        pairs += [(term, 1.0), (term, total), (term, largest)]
    joint = product_term(request_vars)
    pairs.append((joint if "*" in joint else "zero", largest))
    return pairs


def work_units(signature_json: str, request_vars: Sequence[str]) -> dict[str, int]:
    """Elements per unit of each request variable: for every input whose shape holds the variable
    (as "T" or "8*T"), the product of its other dims times the factor; the largest over inputs.
    Kernels that work in blocks of elements care about the exact element count (see
    dooly.fit.curves); 1 where the signature does not say (it holds no input shapes)."""
    try:
        payload = json.loads(signature_json or "{}")
    except ValueError:
        payload = {}
    inputs = payload.get("inputs", []) if isinstance(payload, dict) else []
    units = {var: 1 for var in request_vars}
    for entry in inputs:
        shape = entry[1] if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], list) else []
        for var in request_vars:
            size = 1
            holds = False
            for dim in shape:
                if isinstance(dim, int):
                    size *= max(dim, 1)
                    continue
                match = _SCALED_VAR.match(str(dim))
                if match and match.group(2) == var:
                    holds = True
                    size *= int(match.group(1) or 1)
            if holds:
                units[var] = max(units[var], size)
    return units


def local_terms(family: str, request_vars: Sequence[str]) -> tuple[str, ...]:
    """The request terms a one-signature linear model uses."""
    if family == FAMILY_ATTENTION:
        return LOCAL_ATTENTION_TERMS
    ordered = [v for v in REQUEST_VARS if v in request_vars]
    return ("const", *ordered, *(f"{a}*{b}" for a, b in combinations(ordered, 2)))


# ---------------------------------------------------------------------------------------------
# Request terms


def kernel_waves(tokens: np.ndarray | float, wave_tiles: np.ndarray | float) -> np.ndarray:
    """Waves a packed attention call of `tokens` query rows takes (see QUERY_TILE); where
    `wave_tiles` is 0 (platform unknown), tokens / QUERY_TILE, unquantised."""
    tokens = np.asarray(tokens, dtype=np.float64)
    wave_tiles = np.asarray(wave_tiles, dtype=np.float64)
    tiles = np.ceil(tokens / QUERY_TILE)
    quantised = np.ceil(tiles / np.where(wave_tiles > 0, wave_tiles, 1.0) - WAVE_ROUNDING)
    return np.where(wave_tiles > 0, quantised, tokens / QUERY_TILE)


def with_wave_tiles(terms: np.ndarray, wave_tiles: float) -> np.ndarray:
    """Request terms of the same steps for a kernel of another wave size: only `waves_kv`
    depends on it (the heads set the wave size; the window, which sets S, is the same)."""
    out = terms.copy()
    tokens = terms[:, TERM_INDEX["T"]]
    out[:, TERM_INDEX["waves_kv"]] = kernel_waves(tokens, wave_tiles) * terms[:, TERM_INDEX["S"]]
    return out


def kv_alignment_terms(tokens: np.ndarray | float, kv: np.ndarray | float) -> dict[str, np.ndarray]:
    """KV_ALIGNMENT_TERMS of steps of `tokens` queries reading `kv` tokens each."""
    pairs = np.asarray(tokens, dtype=np.float64) * np.asarray(kv, dtype=np.float64)
    length = np.rint(np.asarray(kv, dtype=np.float64)).astype(np.int64)
    odd = length % 2 == 1
    unaligned = ~odd & (length % KV_ALIGNMENT != 0)
    keys = np.broadcast_to(np.asarray(kv, dtype=np.float64), pairs.shape)
    return {"pairs_odd_kv": np.where(odd, pairs, 0.0), "pairs_unaligned_kv": np.where(unaligned, pairs, 0.0),
            "odd_kv": np.where(odd, keys, 0.0), "unaligned_kv": np.where(unaligned, keys, 0.0)}


def seqs_aggregates(
    q: np.ndarray, ctx: np.ndarray, point: np.ndarray, n_points: int, window: np.ndarray,
    wave_tiles: np.ndarray | float = 0.0,
) -> dict[str, np.ndarray]:
    """Per-point sums over sequences (query length q, cached context ctx, owning point index).

    `window` is per sequence (0: full attention). S follows the tracer's definition:
    sum of min(context, window - 1) + new tokens, or K where there is no window. `wave_tiles`
    (per point, or one for all) sizes the kernel's waves for `waves_kv` (see QUERY_TILE).
    """
    q = q.astype(np.float64)
    ctx = ctx.astype(np.float64)
    kv = q + ctx
    full_pairs = q * ctx + q * (q + 1.0) / 2.0
    has_window = window > 0
    if has_window.any():
        w = window.astype(np.float64)
        capped = np.where(has_window, np.minimum(ctx, np.maximum(w - 1.0, 0.0)) + q, kv)
        # With a window w, query j (1..q) sees min(ctx + j, w) keys.
        first = np.clip(w - ctx, 0.0, q)
        windowed_pairs = first * ctx + first * (first + 1.0) / 2.0 + (q - first) * w
        pairs = np.where(has_window, windowed_pairs, full_pairs)
    else:
        capped = kv
        pairs = full_pairs
    is_decode = (q == 1) & (ctx > 0)
    out = {
        "T": np.bincount(point, weights=q, minlength=n_points),
        "B": np.bincount(point, minlength=n_points).astype(np.float64),
        "K": np.bincount(point, weights=kv, minlength=n_points),
        "D": np.bincount(point, weights=is_decode, minlength=n_points),
    }
    out["S"] = out["K"].copy() if capped is kv else np.bincount(point, weights=capped, minlength=n_points)
    out["attn_pairs"] = np.bincount(point, weights=pairs, minlength=n_points)
    out["padded"] = out["B"] * group_max(q, point, n_points) * group_max(kv, point, n_points)
    out["waves_kv"] = kernel_waves(out["T"], wave_tiles) * out["S"]
    out.update(kv_alignment_terms(out["T"], out["S"]))
    return out


def decode_sums_aggregates(
    seqs: np.ndarray, kv: np.ndarray, longest: np.ndarray, reading: np.ndarray, wave_tiles: float = 0.0,
) -> dict[str, np.ndarray]:
    """`seqs_aggregates` of decode-only points without a window, from their sums: per point its
    decodes, KV tokens (contexts plus one each), longest KV and decodes with a context. Every
    value is an integer, so the sums are the same to the last bit whatever order they were
    added in; a simulation's decode steps are hundreds of thousands of sequences, and summing
    them one by one was most of its coverage report."""
    tokens = seqs.astype(np.float64)
    keys = kv.astype(np.float64)
    out = {
        "T": tokens,
        "B": tokens.copy(),
        "K": keys,
        "D": reading.astype(np.float64),
        "S": keys.copy(),
        "attn_pairs": keys.copy(),
    }
    out["padded"] = out["B"] * np.where(seqs > 0, 1.0, 0.0) * longest.astype(np.float64)
    out["waves_kv"] = kernel_waves(out["T"], wave_tiles) * out["S"]
    out.update(kv_alignment_terms(out["T"], out["S"]))
    return out


def group_max(values: np.ndarray, point: np.ndarray, n_points: int) -> np.ndarray:
    """Per-point maximum (0 for points without sequences); fast when `point` is sorted."""
    out = np.zeros(n_points)
    if len(values) == 0:
        return out
    if np.all(point[1:] >= point[:-1]):
        starts = np.flatnonzero(np.r_[True, point[1:] != point[:-1]])
        out[point[starts]] = np.maximum.reduceat(values, starts)
    else:
        np.maximum.at(out, point, values)
    return out


def aggregates_from_seqs(
    seqs_per_point: Sequence[Sequence[Sequence[int]]], windows: Sequence[int] | np.ndarray | int = 0,
    wave_tiles: Sequence[float] | np.ndarray | float = 0.0,
) -> dict[str, np.ndarray]:
    """Request variables and attention aggregates of many points given as [[q, ctx], ...] lists."""
    n_points = len(seqs_per_point)
    lengths = np.fromiter((len(s) for s in seqs_per_point), dtype=np.int64, count=n_points)
    flat = np.array([pair for seqs in seqs_per_point for pair in seqs], dtype=np.int64).reshape(-1, 2)
    point = np.repeat(np.arange(n_points), lengths)
    per_point = np.broadcast_to(np.asarray(windows, dtype=np.int64), (n_points,))
    waves = np.broadcast_to(np.asarray(wave_tiles, dtype=np.float64), (n_points,))
    return seqs_aggregates(flat[:, 0], flat[:, 1], point, n_points, per_point[point], waves)


def uniform_aggregates(
    request: Mapping[str, np.ndarray], window: np.ndarray, wave_tiles: np.ndarray | float = 0.0
) -> dict[str, np.ndarray]:
    """Attention aggregates when only T, B, K, D are known: every sequence gets the mean shape.

    An approximation for callers that do not keep the per-sequence structure; pass `seqs` for the
    exact features.
    """
    t = np.asarray(request.get("T", 0), dtype=np.float64)
    b = np.maximum(np.asarray(request.get("B", 1), dtype=np.float64), 1.0)
    k = np.asarray(request.get("K", t), dtype=np.float64)
    q = t / b
    ctx = np.maximum(k / b - q, 0.0)
    w = np.asarray(window, dtype=np.float64)
    first = np.clip(w - ctx, 0.0, q)
    windowed = first * ctx + first * (first + 1.0) / 2.0 + (q - first) * w
    full = q * ctx + q * (q + 1.0) / 2.0
    pairs = b * np.where(w > 0, windowed, full)
    s = np.where(w > 0, b * (np.minimum(ctx, np.maximum(w - 1, 0)) + q), k)
    return {"attn_pairs": pairs, "padded": b * np.ceil(q) * np.ceil(q + ctx), "S": s,
            "waves_kv": kernel_waves(t, wave_tiles) * s, **kv_alignment_terms(t, s)}


# Batch regimes: attention kernels often take different paths for prefill-only, decode-only and
# mixed batches; a per-signature linear model may keep one coefficient vector per regime.
REGIME_PREFILL = 0
REGIME_DECODE = 1
REGIME_MIXED = 2
N_REGIMES = 3


def regime_of(terms: np.ndarray) -> np.ndarray:
    """Per row: decode-only (every sequence decodes), prefill-only (none does) or mixed."""
    d = terms[:, TERM_INDEX["D"]]
    b = terms[:, TERM_INDEX["B"]]
    return np.where(d <= 0, REGIME_PREFILL, np.where(d >= b, REGIME_DECODE, REGIME_MIXED))


def regime_scalar(d: float, b: float) -> int:
    """regime_of for one step (the step predictor's scalar path)."""
    if d <= 0:
        return REGIME_PREFILL
    return REGIME_DECODE if d >= b else REGIME_MIXED


def term_matrix(request: Mapping[str, Any], n: int) -> np.ndarray:
    """The (n, N_TERMS) matrix of request terms; absent variables count as 0."""
    out = np.zeros((n, N_TERMS))
    out[:, TERM_INDEX["const"]] = 1.0
    for name in (*REQUEST_VARS, *ATTENTION_TERMS, *KV_ALIGNMENT_TERMS):
        if name in request:
            out[:, TERM_INDEX[name]] = np.asarray(request[name], dtype=np.float64)
    for a, b in combinations(REQUEST_VARS, 2):
        out[:, TERM_INDEX[f"{a}*{b}"]] = out[:, TERM_INDEX[a]] * out[:, TERM_INDEX[b]]
    return out


def physical_design(terms: np.ndarray, term_index: np.ndarray, multiplier: np.ndarray) -> np.ndarray:
    """Rows' physical features: term (per row, chosen per signature) times static factor.

    term_index and multiplier are (n, F): each row carries its signature's static part.
    """
    rows = np.arange(terms.shape[0])[:, None]
    return terms[rows, term_index] * multiplier


def log_design(
    terms: np.ndarray, physical: np.ndarray, config_matrix: np.ndarray, var_mask: np.ndarray
) -> np.ndarray:
    """Features for the log-space regressors: logs of the request variables the op depends on,
    of the attention aggregates, of the physical features and of the config dims."""
    var_cols = [TERM_INDEX[v] for v in REQUEST_VARS]
    attn_cols = [TERM_INDEX[a] for a in ATTENTION_TERMS]
    request = terms[:, var_cols] * var_mask
    regime = regime_of(terms)
    return np.hstack(
        [
            np.log1p(np.maximum(request, 0.0)),
            np.log1p(np.maximum(terms[:, attn_cols], 0.0)),
            np.log1p(np.maximum(physical, 0.0)),
            np.log1p(np.maximum(config_matrix, 0.0)),
            np.stack([regime == REGIME_DECODE, regime == REGIME_PREFILL], axis=1).astype(np.float64),
        ]
    )


def var_mask_of(request_vars: Sequence[str]) -> np.ndarray:
    return np.array([1.0 if v in request_vars else 0.0 for v in REQUEST_VARS])


def config_vector(config_dims: Mapping[str, int], names: Sequence[str]) -> np.ndarray:
    return np.array([float(config_dims.get(name, 0) or 0) for name in names])


def parse_point(point_key: str) -> dict[str, Any]:
    """A shard row's point: {"seqs": [[q, ctx], ...]} for attention, {"T": 64, ...} otherwise."""
    payload = json.loads(point_key) if point_key else {}
    if not isinstance(payload, dict):
        raise DoolyError(f"point_key {point_key!r} is not a JSON object")
    return payload


def request_from_rows(
    columns: Mapping[str, np.ndarray], point_keys: Sequence[str], windows: np.ndarray,
    wave_tiles: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Request variables and attention aggregates of shard rows.

    Starts from the T, B, K, D columns; a point with `seqs` supplies every variable and the
    attention aggregates (with each row's sliding window), one with scalar entries overrides them.
    """
    n = len(point_keys)
    waves = np.zeros(n) if wave_tiles is None else np.asarray(wave_tiles, dtype=np.float64)
    request = {v: np.asarray(columns.get(v, np.zeros(n)), dtype=np.float64).copy() for v in REQUEST_VARS}
    request["S"] = request["K"].copy()
    for name in (*ATTENTION_TERMS, *KV_ALIGNMENT_TERMS):
        request[name] = np.zeros(n)
    seq_rows: list[int] = []
    seq_lists: list[list[list[int]]] = []
    for i, key in enumerate(point_keys):
        point = parse_point(key)
        seqs = point.get("seqs")
        if seqs:
            seq_rows.append(i)
            seq_lists.append(seqs)
        for name in REQUEST_VARS:
            if name in point and not isinstance(point[name], list):
                request[name][i] = float(point[name])
    if seq_rows:
        idx = np.array(seq_rows)
        agg = aggregates_from_seqs(seq_lists, windows[idx], waves[idx])
        for name, values in agg.items():
            request[name][idx] = values
    return request


def log_grid(low: float, high: float, per_octave: int) -> np.ndarray:
    """Geometric grid from low to high (inclusive), `per_octave` points per doubling."""
    octaves = math.log2(high / low)
    return low * np.exp2(np.arange(int(math.ceil(octaves * per_octave)) + 1) / per_octave)

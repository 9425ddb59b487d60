"""Which config field(s) a config-fixed dimension derives from, decided by a second trace.

Matching a size against config values alone cannot be exact: 32 may be the number of heads, of
layers, or a batch size. So the tracer runs the same forward twice: once with the real config and
once with a *probe* config in which every shape-bearing field gets a distinct value (distinct
primes, with the structural equalities of the real config kept so the same code path runs). For
each config-fixed dimension we then look for the simplest expression over config fields that gives
the real size under the real config AND the probe size under the probe config. Two different
expressions agreeing on both is, for our primes, practically impossible; a dimension equal in both
traces is a literal constant of the code (the `1` of an unsqueeze, the `2` of a rotary split).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# Config fields that set tensor shapes. Layer counts and patterns are structural (they choose the
# code path) and token ids are values, so neither is probed.
SHAPE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "num_local_experts",
    "num_experts",
    "num_experts_per_tok",
    "sliding_window",
    "max_position_embeddings",
)
# Fields whose probe value may switch the forward's code path (a window the probe batch's contexts
# exceed, positions that size a cache), tried first when the probe pass runs other operations
# (tracer._probe_on_same_path); then every other probed field, up to MAX_PATH_RETRIES passes.
PATH_FIELDS = ("sliding_window", "max_position_embeddings", "num_experts_per_tok", "head_dim")
MAX_PATH_RETRIES = 4
# Fields tensor parallelism divides across ranks.
TP_SHARDED_FIELDS = ("num_attention_heads", "num_key_value_heads", "intermediate_size", "moe_intermediate_size", "vocab_size")

# Probe values: distinct primes. Sizes that become a tensor's last dim are multiples of 8 elements,
# because grouped GEMMs require 16-byte aligned strides (and halves must stay integral for rotary).
PROBE_ALIGN = 8
PROBE_KV_HEADS = 3
PROBE_GROUP = 5
PROBE_HEAD_DIM = PROBE_ALIGN * 7
PROBE_FREE_HIDDEN = PROBE_ALIGN * 19
PROBE_INTERMEDIATE = PROBE_ALIGN * 23
PROBE_MOE_INTERMEDIATE = PROBE_ALIGN * 41
PROBE_SHARED_INTERMEDIATE = PROBE_ALIGN * 43
PROBE_VOCAB = PROBE_ALIGN * 29
PROBE_EXPERTS = 17
PROBE_TOP_K = 13
PROBE_SLIDING_WINDOW = 31
PROBE_MAX_POSITIONS = 65537
# The engine's cache geometry is probed too (it shapes the KV cache tensors): each engine module
# gives its real and probe values for these fields (EngineKind.geometry).
ENGINE_FIELDS = ("engine.block_size", "engine.num_blocks", "engine.max_batch_tokens")
# The KV cache holds two spare blocks (read trash and sentinel) beyond those the allocator hands out.
CACHE_SPARE_BLOCKS = 2

_SMALL_FACTORS = (2, 3, 4)
# A per-rank size of a field tensor parallelism does not shard is a last resort.
_UNSHARDED_PER_RANK_PENALTY = 4
# Dividing one field by another is rarer in model code than a product or a per-rank shard.
_FIELD_DIVISION_PENALTY = 2


@dataclass(frozen=True)
class Quantity:
    name: str  # expression text, e.g. "num_key_value_heads*head_dim"
    fields: tuple[str, ...]
    real: int
    probe: int
    complexity: int


def probe_overrides(config: dict[str, Any], tp: int) -> dict[str, int]:
    """Distinct values for the shape fields, keeping the equalities that choose code paths."""
    heads = config.get("num_attention_heads")
    overrides: dict[str, int] = {}
    if heads:
        kv = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        # One KV head per rank takes other code paths (a reshape that needs no copy): keep it.
        kv_p = PROBE_KV_HEADS * tp if kv // tp > 1 else kv
        group_p = PROBE_GROUP if heads != kv else 1
        overrides["num_key_value_heads"] = kv_p
        overrides["num_attention_heads"] = kv_p * group_p
        overrides["head_dim"] = PROBE_HEAD_DIM
        if config["hidden_size"] == heads * head_dim:
            overrides["hidden_size"] = overrides["num_attention_heads"] * PROBE_HEAD_DIM
        else:
            overrides["hidden_size"] = PROBE_FREE_HIDDEN
    simple = {
        "intermediate_size": PROBE_INTERMEDIATE * tp,
        "moe_intermediate_size": PROBE_MOE_INTERMEDIATE * tp,
        "shared_expert_intermediate_size": PROBE_SHARED_INTERMEDIATE * tp,
        "vocab_size": PROBE_VOCAB * tp,
        "num_local_experts": PROBE_EXPERTS,
        "num_experts": PROBE_EXPERTS,
        "sliding_window": PROBE_SLIDING_WINDOW,
        "max_position_embeddings": PROBE_MAX_POSITIONS,
    }
    for name, value in simple.items():
        if isinstance(config.get(name), int) and config[name] > 1:
            overrides[name] = value
    pad = config.get("pad_token_id")
    vocab_p = overrides.get("vocab_size")
    if isinstance(pad, int) and vocab_p and pad >= vocab_p:
        overrides["pad_token_id"] = vocab_p - 1  # a token id, not a size: it only has to stay in range
    top_k = config.get("num_experts_per_tok")
    if isinstance(top_k, int) and top_k > 1:
        overrides["num_experts_per_tok"] = PROBE_TOP_K
    return overrides


def base_quantities(
    real: dict[str, Any], probe: dict[str, Any], engine_real: dict[str, int], engine_probe: dict[str, int], tp: int
) -> list[Quantity]:
    """The named config values an expression may use, each with its real and probe value."""
    bases: list[Quantity] = []
    for name in SHAPE_FIELDS:
        r, p = real.get(name), probe.get(name)
        if isinstance(r, int) and isinstance(p, int) and r > 0:
            bases.append(Quantity(name, (name,), r, p, 1))
    if not isinstance(real.get("head_dim"), int) and real.get("num_attention_heads"):
        r = real["hidden_size"] // real["num_attention_heads"]
        p = probe["hidden_size"] // probe["num_attention_heads"]
        bases.append(Quantity("hidden_size/num_attention_heads", ("hidden_size", "num_attention_heads"), r, p, 2))
    for name in ENGINE_FIELDS:
        bases.append(Quantity(name, (name,), engine_real[name], engine_probe[name], 1))
    rows_r = (engine_real["engine.num_blocks"] + CACHE_SPARE_BLOCKS) * engine_real["engine.block_size"]
    rows_p = (engine_probe["engine.num_blocks"] + CACHE_SPARE_BLOCKS) * engine_probe["engine.block_size"]
    bases.append(
        Quantity(
            f"(engine.num_blocks+{CACHE_SPARE_BLOCKS})*engine.block_size",
            ("engine.num_blocks", "engine.block_size"),
            rows_r,
            rows_p,
            2,
        )
    )
    # The engine's bulk input buffer has one column beyond max_batch_tokens.
    bases.append(
        Quantity(
            "engine.max_batch_tokens+1",
            ("engine.max_batch_tokens",),
            engine_real["engine.max_batch_tokens"] + 1,
            engine_probe["engine.max_batch_tokens"] + 1,
            2,
        )
    )
    if tp > 1:
        bases.append(Quantity("tp", ("tp",), tp, tp, 1))
    return bases


class Attributor:
    """Finds the simplest expression over config fields matching a (real, probe) pair of sizes."""

    def __init__(self, bases: list[Quantity], tp: int) -> None:
        self.tp = tp
        self.table: dict[tuple[int, int], Quantity] = {}
        for quantity in self._expressions(bases):
            key = (quantity.real, quantity.probe)
            known = self.table.get(key)
            if known is None or quantity.complexity < known.complexity:
                self.table[key] = quantity

    def attribute(self, real: int, probe: int) -> Quantity | None:
        return self.table.get((real, probe))

    def _expressions(self, bases: list[Quantity]) -> list[Quantity]:
        fields = [b for b in bases if b.name != "tp"]
        found: list[Quantity] = list(fields)
        for b in fields:
            for factor in _SMALL_FACTORS:
                found.append(Quantity(f"{factor}*{b.name}", b.fields, factor * b.real, factor * b.probe, b.complexity + 1))
                # Under tensor parallelism a halving by tp is a shard, never a literal split.
                if b.real % factor == 0 and b.probe % factor == 0 and factor != self.tp:
                    found.append(Quantity(f"{b.name}/{factor}", b.fields, b.real // factor, b.probe // factor,
                                          b.complexity + 2))
        for a, b in itertools.permutations(fields, 2):
            found.append(_product(a, b))
            if b.real and b.probe and a.real % b.real == 0 and a.probe % b.probe == 0:
                found.append(
                    Quantity(f"{a.name}/{b.name}", a.fields + b.fields, a.real // b.real, a.probe // b.probe,
                             a.complexity + b.complexity + _FIELD_DIVISION_PENALTY)
                )
        for a, b, c in itertools.permutations(fields, 3):
            found.append(
                Quantity(
                    f"({a.name}+2*{b.name})*{c.name}",
                    a.fields + b.fields + c.fields,
                    (a.real + 2 * b.real) * c.real,
                    (a.probe + 2 * b.probe) * c.probe,
                    a.complexity + b.complexity + c.complexity + 2,
                )
            )
            found.append(
                Quantity(
                    f"{a.name}*{b.name}*{c.name}",
                    a.fields + b.fields + c.fields,
                    a.real * b.real * c.real,
                    a.probe * b.probe * c.probe,
                    a.complexity + b.complexity + c.complexity + 1,
                )
            )
        if self.tp > 1:
            found += [self._per_rank(q) for q in list(found) if q.real % self.tp == 0 and q.probe % self.tp == 0]
        return found

    def _per_rank(self, q: Quantity) -> Quantity:
        # A per-rank size is its full size over tp; preferred over "/2" when tp == 2 because the
        # sharded fields are exactly the ones tensor parallelism divides.
        sharded = any(f in TP_SHARDED_FIELDS for f in q.fields)
        penalty = 0 if sharded else _UNSHARDED_PER_RANK_PENALTY
        return Quantity(f"{_paren(q.name)}/tp", q.fields + ("tp",), q.real // self.tp, q.probe // self.tp,
                        q.complexity + penalty)


def _product(a: Quantity, b: Quantity) -> Quantity:
    return Quantity(f"{_paren(a.name)}*{_paren(b.name)}", a.fields + b.fields, a.real * b.real, a.probe * b.probe,
                    a.complexity + b.complexity + 1)


def _paren(name: str) -> str:
    return f"({name})" if any(ch in name for ch in "+/") and not name.startswith("(") else name

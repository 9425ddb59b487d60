"""The trace: what one engine step executes, and where every dimension comes from.

A trace is a list of operations. Each operation holds its input and output tensors; each tensor
dimension says whether the incoming batch sets it (origin "request", with an exact expression over
the request variables) or the model configuration fixes it (origin "config", with the value and
the config field expression it derives from; literal constants of the code have no fields).

The JSON written by `dooly trace --out FILE` is `Trace.to_dict()`; see docs/trace.md.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

TRACE_FORMAT_VERSION = 1

ORIGIN_REQUEST = "request"
ORIGIN_CONFIG = "config"

# Request variables: what the incoming batch decides.
REQUEST_VARIABLES = {
    "T": "query tokens in the step (prefill chunks + decodes)",
    "B": "sequences in the step",
    "K": "KV tokens read by full-attention layers (sum of context + new tokens)",
    "S": "KV tokens read by sliding-window layers (sum of min(context, window-1) + new tokens)",
}

# What an operation is, for the profiler: a kernel it measures, a view that costs nothing, the
# engine's attention call (measured as one op through the engine), an op inside that call, or a
# collective a tensor-parallel rank issues.
KIND_KERNEL = "kernel"
KIND_VIEW = "view"
KIND_ATTENTION = "attention"
KIND_INNER = "attention-inner"
KIND_COLLECTIVE = "collective"
MEASURED_KINDS = (KIND_KERNEL, KIND_ATTENTION, KIND_COLLECTIVE)


@dataclass(frozen=True)
class Dim:
    origin: str  # request | config
    value: int  # the size at the traced point
    expr: str  # "T", "8*T", "B + 1" for request dims; "num_key_value_heads*head_dim" or "1" for config
    fields: tuple[str, ...] = ()  # config fields the dim derives from (empty for literal constants)
    config_expr: str = ""  # request dims with config coefficients: "num_attention_heads*T"

    def to_dict(self) -> dict[str, Any]:
        payload: dict[str, Any] = {"origin": self.origin, "value": self.value, "expr": self.expr}
        if self.fields:
            payload["fields"] = list(self.fields)
        if self.config_expr:
            payload["config_expr"] = self.config_expr
        return payload

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> Dim:
        return cls(
            origin=payload["origin"],
            value=int(payload["value"]),
            expr=payload["expr"],
            fields=tuple(payload.get("fields", ())),
            config_expr=payload.get("config_expr", ""),
        )

    @property
    def is_labeled(self) -> bool:
        return self.origin in (ORIGIN_REQUEST, ORIGIN_CONFIG) and bool(self.expr)

    def signature_token(self) -> Any:
        """Request dims enter a signature as their expression, config dims as their value."""
        return self.expr if self.origin == ORIGIN_REQUEST else self.value


@dataclass(frozen=True)
class TensorSpec:
    dims: tuple[Dim, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "dims": [d.to_dict() for d in self.dims]}

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> TensorSpec:
        return cls(dims=tuple(Dim.from_dict(d) for d in payload["dims"]), dtype=payload["dtype"])

    def shape_text(self) -> str:
        return "[" + ",".join(str(d.signature_token()) for d in self.dims) + "]"


@dataclass
class Operation:
    op: str  # aten overload ("aten.mm.default"), "attention", or "collective.all_reduce"
    kind: str
    module: str  # module path with layer indices folded ("model.layers.*.self_attn.q_proj")
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    scalars: dict[str, Any] = field(default_factory=dict)
    count: int = 1  # executions per forward of the full model
    backend: str = ""  # attention backend for attention ops, "" otherwise
    layout: str = ""  # aten ops: where the tensors sit among the arguments (recorder.arg_layout)

    def all_dims(self) -> list[Dim]:
        return [d for t in (*self.inputs, *self.outputs) for d in t.dims]

    def request_vars(self) -> list[str]:
        """The request variables the operation's work depends on: those of its input dims, and of
        its scalar arguments (a factory op such as `arange(end=2*T)` has no inputs at all)."""
        names: set[str] = set()
        for spec in self.inputs:
            for dim in spec.dims:
                if dim.origin == ORIGIN_REQUEST:
                    names.update(_variables_in(dim.expr))
        pending = list(self.scalars.values())
        while pending:
            value = pending.pop()
            if isinstance(value, str):
                names.update(_variables_in(value))
            elif isinstance(value, (list, tuple)):
                pending.extend(value)
        return sorted(names)

    def config_dims(self) -> dict[str, int]:
        """Config-fixed input dims by position ("in0.1" = input 0, dim 1), plus named attention fields."""
        dims = {
            f"in{i}.{j}": d.value
            for i, spec in enumerate(self.inputs)
            for j, d in enumerate(spec.dims)
            if d.origin == ORIGIN_CONFIG
        }
        dims.update({k: v for k, v in self.scalars.items() if isinstance(v, int) and not isinstance(v, bool)})
        return dims

    def signature_payload(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "backend": self.backend,
            "inputs": [[spec.dtype, [d.signature_token() for d in spec.dims]] for spec in self.inputs],
            "scalars": self.scalars,
            "layout": self.layout,
        }

    def signature(self) -> str:
        return signature_hash(self.signature_payload())

    def op_class(self) -> str:
        if self.kind == KIND_ATTENTION:
            return f"attention:{self.backend}"
        return self.op

    def to_dict(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "kind": self.kind,
            "module": self.module,
            "backend": self.backend,
            "count": self.count,
            "signature": self.signature(),
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "scalars": self.scalars,
            "layout": self.layout,
        }

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> Operation:
        return cls(
            op=payload["op"],
            kind=payload["kind"],
            module=payload["module"],
            inputs=[TensorSpec.from_dict(t) for t in payload["inputs"]],
            outputs=[TensorSpec.from_dict(t) for t in payload["outputs"]],
            scalars=payload.get("scalars", {}),
            count=int(payload["count"]),
            backend=payload.get("backend", ""),
            layout=payload.get("layout", ""),
        )


@dataclass
class Trace:
    model_id: str
    model_key: str
    architecture: str
    engine: str
    engine_version: str
    phase: str
    backend: str
    tp: int
    dtype: str
    request_point: dict[str, int]  # the hints the symbols were traced with
    traced_layers: int
    total_layers: int
    operations: list[Operation]
    collectives: list[Operation] = field(default_factory=list)
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)  # the config facts traced: a trace stands alone

    def signatures(self, kinds: tuple[str, ...] = MEASURED_KINDS) -> dict[str, Operation]:
        found: dict[str, Operation] = {}
        for op in (*self.operations, *self.collectives):
            if op.kind in kinds:
                found.setdefault(op.signature(), op)
        return found

    def unlabeled_dims(self) -> int:
        return sum(1 for op in (*self.operations, *self.collectives) for d in op.all_dims() if not d.is_labeled)

    def dims_by_origin(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for op in (*self.operations, *self.collectives):
            for dim in op.all_dims():
                counts[dim.origin] = counts.get(dim.origin, 0) + 1
        return counts

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.model_id,
            "phase": self.phase,
            "backend": self.backend,
            "tp": self.tp,
            "operations": len(self.operations) + len(self.collectives),
            "executions_per_forward": sum(op.count for op in (*self.operations, *self.collectives)),
            "signatures": len(self.signatures()),
            "collectives": len(self.collectives),
            "dims_by_origin": self.dims_by_origin(),
            "unlabeled_dims": self.unlabeled_dims(),
            "seconds": round(self.seconds, 3),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": TRACE_FORMAT_VERSION,
            "model_id": self.model_id,
            "model_key": self.model_key,
            "architecture": self.architecture,
            "engine": self.engine,
            "engine_version": self.engine_version,
            "phase": self.phase,
            "backend": self.backend,
            "tp": self.tp,
            "dtype": self.dtype,
            "request_point": self.request_point,
            "request_variables": REQUEST_VARIABLES,
            "traced_layers": self.traced_layers,
            "total_layers": self.total_layers,
            "seconds": self.seconds,
            "operations": [op.to_dict() for op in self.operations],
            "collectives": [op.to_dict() for op in self.collectives],
            "config": self.config,
        }

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> Trace:
        return cls(
            model_id=payload["model_id"],
            model_key=payload["model_key"],
            architecture=payload["architecture"],
            engine=payload["engine"],
            engine_version=payload["engine_version"],
            phase=payload["phase"],
            backend=payload["backend"],
            tp=int(payload["tp"]),
            dtype=payload["dtype"],
            request_point=payload["request_point"],
            traced_layers=int(payload["traced_layers"]),
            total_layers=int(payload["total_layers"]),
            operations=[Operation.from_dict(o) for o in payload["operations"]],
            collectives=[Operation.from_dict(o) for o in payload.get("collectives", [])],
            seconds=float(payload.get("seconds", 0.0)),
            config=payload.get("config", {}),
        )


def signature_hash(payload: dict[str, Any]) -> str:
    """A hash that only depends on the canonical JSON of the payload: stable across processes,
    machines and versions of this project (dict order, whitespace and float repr are fixed)."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _variables_in(expr: str) -> set[str]:
    return {name for name in REQUEST_VARIABLES if _mentions(expr, name)}


def _mentions(expr: str, name: str) -> bool:
    return re.search(rf"\b{name}\b", expr) is not None



"""Trace one engine step of a model: no weights, no GPU, seconds even for 70B.

How: the model, the paged KV cache and the engine's IO buffers are built from the config inside a
FakeTensorMode (shapes only). The engine prepares the step's inputs for a concrete batch; we then
swap every input size that the batch decides for a symbol (T, B, K, S) of a ShapeEnv, so PyTorch's
symbolic shapes carry the request dims through every aten op exactly, whatever the numbers. The
same forward is traced a second time with a probe config (attribution.py) to name the config
field behind each fixed size. Layers repeat, so one period of the layer pattern is traced and its
operation counts multiplied out.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sympy
import torch

from dooly.engines.base import Batch, EngineKind, SeqShape
from dooly.engines.registry import DEFAULT_ENGINE, engine_kind
from dooly.errors import DoolyError
from dooly.trace import attribution
from dooly.trace.recorder import (
    ModuleStack,
    OpRecorder,
    RawEvent,
    capture_attention,
    capture_collectives,
    capture_module_attention,
)
from dooly.trace.schema import (
    KIND_COLLECTIVE,
    ORIGIN_CONFIG,
    ORIGIN_REQUEST,
    Dim,
    Operation,
    TensorSpec,
    Trace,
)

if TYPE_CHECKING:
    from dooly.models.registry import ModelSpec

log = logging.getLogger(__name__)

PHASES = ("prefill", "decode", "mixed")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Batches the symbols are traced with. Only their structure matters (the sizes become symbols);
# each phase's request variables must take pairwise distinct values >= 2 so no symbol is merged.
_PREFILL_QUERIES = (5, 9, 13)
_DECODE_SEQS = 3
_MIXED_PREFILL = ((7, 0), (6, 11))
_MIXED_DECODES = 2
# Contexts must exceed the sliding window so that S (sliding reads) differs from K (full reads).
_CONTEXT_BASE = 17
_CONTEXT_STEP = 8
_LAYER_PREFIX = re.compile(r"^(.*?\blayers)\.(\d+)(\.|$)")
# The collector generation holding all that a trace allocated while collection was paused.
_YOUNGEST_GENERATION = 0


@dataclass
class _Pass:
    events: list[RawEvent]
    symbols: dict[sympy.Symbol, str]  # ShapeEnv symbol -> request variable name
    point: dict[str, int]


def request_batch(phase: str, window: int | None) -> Batch:
    """A batch of the phase's structure whose request variables take distinct values."""
    context = _CONTEXT_BASE + (window or 0)
    if phase == "prefill":
        return Batch(tuple(SeqShape(q, 0) for q in _PREFILL_QUERIES))
    if phase == "decode":
        return Batch(tuple(SeqShape(1, context + i * _CONTEXT_STEP) for i in range(_DECODE_SEQS)))
    if phase == "mixed":
        prefill = [SeqShape(q, c + (window or 0) if c else 0) for q, c in _MIXED_PREFILL]
        decodes = [SeqShape(1, context + i * _CONTEXT_STEP) for i in range(_MIXED_DECODES)]
        return Batch(tuple(prefill + decodes))
    raise DoolyError(f"unknown phase {phase!r}; choose one of {', '.join(PHASES)}")


def request_values(phase: str, batch: Batch, window: int | None, engine: str = DEFAULT_ENGINE) -> dict[str, int]:
    """The request variables of a batch, as the engine's step inputs size them."""
    return engine_kind(engine).request_values(phase, batch, window)


def trace_model(
    model: str | ModelSpec,
    *,
    phase: str = "mixed",
    backend: str | None = None,
    tp: int = 1,
    dtype: str = "bfloat16",
    engine: str = DEFAULT_ENGINE,
) -> Trace:
    """Trace one step of `model` (a bundled id, a config.json path or a directory holding one, or
    a config already resolved, such as one a store keeps) as `engine` runs it (its default
    attention backend unless `backend` names one)."""
    from dooly.models.registry import ModelSpec, build_hf_config, model_key, resolve_model

    started = time.perf_counter()
    kind = engine_kind(engine)
    backend = backend or kind.default_backend
    if phase not in PHASES:
        raise DoolyError(f"unknown phase {phase!r}; choose one of {', '.join(PHASES)}")
    if backend not in kind.backends():
        raise DoolyError(
            f"attention backend {backend!r} is not one the {engine} engine runs; choose one of "
            f"{', '.join(kind.backends())}"
        )
    if tp > 1 and engine != DEFAULT_ENGINE:
        raise DoolyError(f"--tp {tp}: the {engine} adapter traces one rank of tp=1 only")
    if dtype not in DTYPES:
        raise DoolyError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if tp < 1:
        raise DoolyError(f"--tp must be >= 1, got {tp}")
    with _collection_paused():
        spec = model if isinstance(model, ModelSpec) else resolve_model(model)
        hf_config = build_hf_config(spec)
        text = hf_config.get_text_config()
        _check_tp(text, tp)
        period, multipliers = layer_plan(text)
        window = _window(text)

        real_cfg = _reduced(hf_config, period, tp, {})
        full = {k: v for k, v in text.to_dict().items()}
        overrides = kind.probe_overrides(attribution.probe_overrides(full, tp), full)
        probe_cfg = _reduced(hf_config, period, tp, overrides)
        probe_window = _window(probe_cfg.get_text_config())

        batch = request_batch(phase, window)
        probe_batch = request_batch(phase, probe_window)
        engine_real = kind.geometry(batch, probe=False)
        engine_probe = kind.geometry(probe_batch, probe=True)
        torch_dtype = DTYPES[dtype]
        tp_plan = _tp_plan(hf_config) if tp > 1 else {}
        def trace_probe(fields: dict[str, int]) -> tuple[_Pass, dict[str, int]]:
            config = _reduced(hf_config, period, tp, fields)
            probe_window = _window(config.get_text_config())
            probe_batch = request_batch(phase, probe_window)
            geometry = kind.geometry(probe_batch, probe=True)
            traced = _trace_pass(kind, config, phase, backend, torch_dtype, probe_batch, probe_window, geometry,
                                 tp_plan, tp)
            return traced, geometry

        try:
            real = _trace_pass(kind, real_cfg, phase, backend, torch_dtype, batch, window, engine_real, tp_plan, tp)
            probe = _trace_pass(kind, probe_cfg, phase, backend, torch_dtype, probe_batch, probe_window, engine_probe,
                                tp_plan, tp)
            if not _same_path(real, probe):
                probe, engine_probe, overrides = _probe_on_same_path(real, probe, overrides, full, trace_probe,
                                                                     spec.model_id)
        except DoolyError:
            raise
        except Exception as exc:  # noqa: BLE001 - the model's own code failed under shape-only execution
            raise DoolyError(f"tracing {spec.model_id} failed: {type(exc).__name__}: {_first_line(exc)}") from exc

        probe_full = dict(full)
        probe_full.update(overrides)
        bases = attribution.base_quantities(full, probe_full, engine_real, engine_probe, tp)
        attributor = attribution.Attributor(bases, tp)
        operations, collectives = _label(real, probe, attributor, multipliers, spec.model_id)
    seconds = time.perf_counter() - started
    return Trace(
        model_id=spec.model_id,
        model_key=model_key(spec),
        architecture=(hf_config.architectures or [type(hf_config).__name__])[0],
        engine=kind.name,
        engine_version=kind.version(),
        phase=phase,
        backend=backend,
        tp=tp,
        dtype=dtype,
        request_point=real.point,
        traced_layers=period,
        total_layers=text.num_hidden_layers,
        operations=operations,
        collectives=collectives,
        seconds=seconds,
        config={k: v for k, v in spec.config.items() if not k.startswith("_")},
    )


@contextlib.contextmanager
def _collection_paused() -> Iterator[None]:
    """Automatic garbage collection paused while a trace runs, its garbage collected once at the end.

    Importing transformers leaves some 400,000 long-lived objects tracked by the collector, and a
    trace allocates a few hundred thousand short-lived ones (fake tensors, SymNodes, sympy
    expressions), so the collector keeps promoting them and running full collections, each of which
    rescans every long-lived object: four of them took 0.4-0.6 s of a first phase and one 0.2 s of
    a later phase now and then (gemma-2-9b, 2-core CPU). Paused, nothing is collected during the
    trace; everything it allocated stays in the youngest generation, which one collection reclaims
    at the end (its time is part of the trace's). A caller that turned collection off keeps it off,
    uncollected."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
    if enabled:
        gc.collect(_YOUNGEST_GENERATION)


def layer_plan(text_config: Any) -> tuple[int, dict[int, int]]:
    """The shortest period of the layer-type pattern, and how many real layers each traced one stands for."""
    total = text_config.num_hidden_layers
    types = list(getattr(text_config, "layer_types", None) or ["layer"] * total)
    period = next(p for p in range(1, total + 1) if all(types[j] == types[j % p] for j in range(total)))
    multipliers = {i: sum(1 for j in range(total) if j % period == i) for i in range(period)}
    return period, multipliers


def _window(text_config: Any) -> int | None:
    types = getattr(text_config, "layer_types", None) or []
    window = getattr(text_config, "sliding_window", None)
    return window if window and "sliding_attention" in types else None


def _reduced(hf_config: Any, period: int, tp: int, overrides: dict[str, int]) -> Any:
    """The config a traced pass builds: one layer period, per-rank sizes, probe overrides applied."""
    config = copy.deepcopy(hf_config)
    text = config.get_text_config()
    for name, value in overrides.items():
        setattr(text, name, value)
    if getattr(text, "head_dim", None) is None and text.num_attention_heads:
        text.head_dim = text.hidden_size // text.num_attention_heads
    if tp > 1:
        for name in attribution.TP_SHARDED_FIELDS:
            size = getattr(text, name, None)
            if isinstance(size, int) and size > 1:
                setattr(text, name, max(size // tp, 1))
    types = getattr(text, "layer_types", None)
    text.num_hidden_layers = period
    if types:
        text.layer_types = list(types[:period])
    return config


def _check_tp(text: Any, tp: int) -> None:
    for name in ("num_attention_heads", "intermediate_size", "vocab_size"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value % tp:
            raise DoolyError(f"--tp {tp} does not divide {name}={value}")
    kv = getattr(text, "num_key_value_heads", None)
    if isinstance(kv, int) and kv > 1 and kv % tp:
        raise DoolyError(f"--tp {tp} does not divide num_key_value_heads={kv}")


def _tp_plan(hf_config: Any) -> dict[str, str]:
    from transformers import AutoModelForCausalLM

    plan = dict(getattr(hf_config.get_text_config(), "base_model_tp_plan", None) or {})
    model_cls = AutoModelForCausalLM._model_mapping[type(hf_config)]
    plan.update(getattr(model_cls, "_tp_plan", None) or {})
    return plan


def _trace_pass(
    kind: EngineKind,
    config: Any,
    phase: str,
    backend: str,
    dtype: torch.dtype,
    batch: Batch,
    window: int | None,
    geometry: dict[str, int],
    tp_plan: dict[str, str],
    tp: int = 1,
) -> _Pass:
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    shape_env = ShapeEnv(duck_shape=False)
    values = kind.request_values(phase, batch, window)
    symbolizer = _Symbolizer(shape_env, values)
    with kind.trace_session(config, backend=backend, dtype=dtype, batch=batch, geometry=geometry,
                            shape_env=shape_env) as step:
        inputs = step.prepare(symbolizer)
        modules = ModuleStack(step.model)
        recorder = OpRecorder(modules)
        if step.attention_modules is None:
            attention = capture_attention(recorder, backend)
        else:
            attention = capture_module_attention(recorder, step.attention_modules, backend, step.attention_metadata,
                                                 step.attention_scalars)
        with modules, attention, capture_collectives(recorder, step.model, tp_plan, tp):
            with recorder, torch.no_grad():
                step.run(inputs)
    _check_not_specialized(shape_env, symbolizer.symbols)
    return _Pass(events=recorder.events, symbols=symbolizer.symbols, point=values)


def _check_not_specialized(shape_env: Any, symbols: dict[sympy.Symbol, str]) -> None:
    """A request symbol pinned to its hint would be labelled a constant: refuse rather than mislabel.

    Seen with torch 2.11, whose fake-tensor size handler turns a symbolic size into an int inside
    some composite ops (matmul in rotary embeddings); torch 2.13 keeps it symbolic."""
    pinned = [name for symbol, name in symbols.items() if symbol in shape_env.replacements]
    if pinned:
        raise DoolyError(
            f"torch {torch.__version__} specialised the request dims {', '.join(sorted(pinned))} while tracing, "
            "so their labels would be wrong; trace with torch 2.13 (`dooly trace --out FILE`) and pass the "
            "trace file to `dooly profile`"
        )


class _Symbolizer:
    """Each input size the batch decides becomes its request symbol (see base.Symbolizer)."""

    def __init__(self, shape_env: Any, values: dict[str, int]) -> None:
        from torch._dynamo.source import ConstantSource
        from torch.fx.experimental.symbolic_shapes import DimDynamic

        self.symints: dict[int, Any] = {}
        self.symbols: dict[sympy.Symbol, str] = {}
        for name, hint in values.items():
            symbol = shape_env.create_symbol(hint, ConstantSource(f"dooly_{name}"), dynamic_dim=DimDynamic.DYNAMIC)
            self.symints[hint] = shape_env.create_symintnode(symbol, hint=hint)
            self.symbols[symbol] = name
        seqs_plus_one = values["B"] + 1
        if seqs_plus_one not in self.symints:
            self.symints[seqs_plus_one] = self.symints[values["B"]] + 1
        if len(self.symints) != len(values) + 1:
            raise RuntimeError(f"request variables collide in the traced batch: {values}")

    def size(self, value: int) -> Any:
        return self.symints.get(int(value), int(value))

    def tensor(self, value: torch.Tensor, dims: tuple[int, ...] | None = None) -> torch.Tensor:
        shape = [
            self.size(size) if dims is None or index in dims else int(size)
            for index, size in enumerate(value.shape)
        ]
        return torch.empty(shape, dtype=value.dtype, device=value.device)

    def tree(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return self.tensor(value)
        if isinstance(value, list):
            return [self.tree(v) for v in value]
        if isinstance(value, dict):
            return {k: self.tree(v) for k, v in value.items()}
        return value


def _same_path(real: _Pass, probe: _Pass) -> bool:
    """Whether the probe pass ran the same operations as the real one (what attribution needs)."""
    return len(real.events) == len(probe.events) and all(
        a.op == b.op and len(a.inputs) == len(b.inputs) for a, b in zip(real.events, probe.events)
    )


def _probe_on_same_path(
    real: _Pass,
    probe: _Pass,
    overrides: dict[str, int],
    full: dict[str, Any],
    trace_probe: Any,
    model_id: str,
) -> tuple[_Pass, dict[str, int], dict[str, int]]:
    """The probe took another code path: find the probed field that switched it and probe again
    with that field at its real value (fields that choose code paths first: a sliding window the
    probe's short contexts exceed while the real ones do not, the positions that size a rotary
    cache). The dims that field sizes are then labelled by value only, every other field still by
    name. Returns the probe pass, its engine geometry and the overrides it used."""
    candidates = sorted(
        (name for name in overrides if name in full and full[name] != overrides[name]),
        key=lambda name: (attribution.PATH_FIELDS.index(name) if name in attribution.PATH_FIELDS
                          else len(attribution.PATH_FIELDS), name),
    )[: attribution.MAX_PATH_RETRIES]
    for name in candidates:
        retried = {**overrides, name: full[name]}
        traced, geometry = trace_probe(retried)
        if _same_path(real, traced):
            log.info("%s: the probe's %s took another code path; probed again with its real value", model_id, name)
            return traced, geometry, retried
    raise DoolyError(
        f"tracing {model_id}: the probe config took another code path ({len(real.events)} vs "
        f"{len(probe.events)} ops) and no single probed field explains it (tried {', '.join(candidates)}), "
        f"so config fields cannot be attributed"
    )


def _label(
    real: _Pass, probe: _Pass, attributor: attribution.Attributor, multipliers: dict[int, int], model_id: str
) -> tuple[list[Operation], list[Operation]]:
    if not _same_path(real, probe):
        raise DoolyError(
            f"tracing {model_id}: the probe config took another code path ({len(real.events)} vs "
            f"{len(probe.events)} ops), so config fields cannot be attributed"
        )
    labeler = _Labeler(real.symbols, probe.symbols, attributor)
    grouped: dict[tuple, Operation] = {}
    for event, twin in zip(real.events, probe.events):
        module, layer = _fold_layer(event.module)
        count = multipliers.get(layer, 1) if layer is not None else 1
        op = Operation(
            op=event.op,
            kind=event.kind,
            module=module,
            inputs=[labeler.tensor(a, b) for a, b in zip(event.inputs, twin.inputs)],
            outputs=[labeler.tensor(a, b) for a, b in zip(event.outputs, twin.outputs)],
            scalars={k: labeler.scalar(v) for k, v in sorted(event.scalars.items())},
            count=count,
            backend=event.backend,
            layout=event.layout,
        )
        key = (op.kind, op.module, op.signature(), tuple(t.shape_text() for t in op.outputs))
        if key in grouped:
            grouped[key].count += count
        else:
            grouped[key] = op
    operations = [op for op in grouped.values() if op.kind != KIND_COLLECTIVE]
    collectives = [op for op in grouped.values() if op.kind == KIND_COLLECTIVE]
    return operations, collectives


class _Labeler:
    def __init__(self, real_symbols: dict, probe_symbols: dict, attributor: attribution.Attributor) -> None:
        self.real_names = {s: sympy.Symbol(n, positive=True, integer=True) for s, n in real_symbols.items()}
        self.probe_names = {s: sympy.Symbol(n, positive=True, integer=True) for s, n in probe_symbols.items()}
        self.attributor = attributor
        self._coefficient_names: dict[tuple[sympy.Expr, sympy.Expr], str | None] = {}

    def tensor(self, real: Any, probe: Any) -> TensorSpec:
        dims = tuple(self.dim(a, b) for a, b in zip(real.sizes, probe.sizes))
        return TensorSpec(dims=dims, dtype=real.dtype)

    def _expr(self, size: Any, names: dict) -> sympy.Expr | None:
        if isinstance(size, torch.SymInt):
            return sympy.sympify(size.node.expr).xreplace(names)
        return None

    def dim(self, real: Any, probe: Any) -> Dim:
        real_expr = self._expr(real, self.real_names)
        if real_expr is not None and real_expr.free_symbols:
            return self._request_dim(real, real_expr, self._expr(probe, self.probe_names))
        value = int(real_expr) if real_expr is not None else int(real)
        probe_value = int(self._expr(probe, self.probe_names) or probe) if probe is not None else value
        return self._config_dim(value, probe_value)

    def _config_dim(self, value: int, probe_value: int) -> Dim:
        if value == probe_value:
            return Dim(origin=ORIGIN_CONFIG, value=value, expr=str(value))
        quantity = self.attributor.attribute(value, probe_value)
        if quantity is None:
            return Dim(origin=ORIGIN_CONFIG, value=value, expr="")
        return Dim(origin=ORIGIN_CONFIG, value=value, expr=quantity.name, fields=quantity.fields)

    def _request_dim(self, real: Any, real_expr: sympy.Expr, probe_expr: sympy.Expr | None) -> Dim:
        value = int(real.node.hint) if real.node.hint is not None else 0
        text = _expr_text(real_expr)
        config_text: str | None = ""
        if probe_expr is not None and probe_expr.free_symbols == real_expr.free_symbols:
            key = (real_expr, probe_expr)
            if key not in self._coefficient_names:
                self._coefficient_names[key] = self._coefficients(real_expr, probe_expr)
            config_text = self._coefficient_names[key]
        if config_text is None:
            return Dim(origin=ORIGIN_REQUEST, value=value, expr="")
        return Dim(origin=ORIGIN_REQUEST, value=value, expr=text, config_expr=config_text)

    def _coefficients(self, real_expr: sympy.Expr, probe_expr: sympy.Expr) -> str | None:
        """Name the config factors of a mixed dim such as 8*T (num_key_value_heads*T).

        Memoised by `_request_dim`: a trace asks for the same few expressions hundreds of times,
        and the two polynomials cost most of labelling."""
        gens = sorted(real_expr.free_symbols, key=str)
        try:
            real_poly = sympy.Poly(real_expr, *gens)
            probe_poly = sympy.Poly(probe_expr, *gens)
        except sympy.PolynomialError:
            return ""
        if real_poly.monoms() != probe_poly.monoms():
            return None
        terms = []
        named = False
        for monom, coeff_real, coeff_probe in zip(real_poly.monoms(), real_poly.coeffs(), probe_poly.coeffs()):
            coeff_real, coeff_probe = int(coeff_real), int(coeff_probe)
            variable = "*".join(
                f"{g}" if power == 1 else f"{g}**{power}" for g, power in zip(gens, monom) if power
            )
            if coeff_real == coeff_probe:
                factor = str(coeff_real)
            else:
                quantity = self.attributor.attribute(coeff_real, coeff_probe)
                if quantity is None:
                    return None
                factor, named = quantity.name, True
            if not variable:
                terms.append(factor)
            elif factor == "1":
                terms.append(variable)
            else:
                terms.append(f"{attribution._paren(factor)}*{variable}")
        return " + ".join(terms) if named else ""

    def scalar(self, value: Any) -> Any:
        if isinstance(value, torch.SymInt):
            expr = sympy.sympify(value.node.expr).xreplace(self.real_names)
            return _expr_text(expr) if expr.free_symbols else int(expr)
        if isinstance(value, (torch.SymFloat, torch.SymBool)):
            return str(value)
        if isinstance(value, list):
            return [self.scalar(v) for v in value]
        if isinstance(value, float):
            return float(f"{value:.9g}")
        return value


def _expr_text(expr: sympy.Expr) -> str:
    return str(expr).replace(" ", "")


def _fold_layer(module: str) -> tuple[str, int | None]:
    match = _LAYER_PREFIX.match(module)
    if not match:
        return module, None
    return f"{match.group(1)}.*{module[match.end(2):]}", int(match.group(2))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


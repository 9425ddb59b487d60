"""Recording what a forward executes: every aten op, the module it ran under, and the engine's
attention call as one operation (its inner ops are kept, marked as such, and not profiled alone).

The recorder sits above a FakeTensorMode, so it sees fake tensors whose sizes are SymInts for the
request-dependent dims and plain ints for the rest; turning those into labels is `labels.py`'s job.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dooly.trace.schema import KIND_ATTENTION, KIND_COLLECTIVE, KIND_INNER, KIND_KERNEL, KIND_VIEW

# Queries about tensors, not computations: the dispatcher reports them, a GPU never runs them.
_METADATA_OPS = {
    "aten.sym_size.int",
    "aten.sym_stride.int",
    "aten.sym_numel.default",
    "aten.sym_storage_offset.default",
    "aten.is_contiguous.default",
    "aten.is_contiguous.memory_format",
    "aten.is_strides_like_format.default",
    "aten.is_non_overlapping_and_dense.default",
    "aten.size.default",
    "aten.stride.default",
    "aten.numel.default",
    "aten.dim.default",
    "aten.is_same_size.default",
}


@dataclass
class RawTensor:
    sizes: tuple[Any, ...]  # ints and SymInts
    dtype: str


@dataclass
class RawEvent:
    op: str
    kind: str
    module: str
    inputs: list[RawTensor]
    outputs: list[RawTensor]
    scalars: dict[str, Any] = field(default_factory=dict)
    backend: str = ""
    layout: str = ""  # how the call's tensors sit in its arguments, to rebuild it (see arg_layout)


def _raw(t: torch.Tensor) -> RawTensor:
    return RawTensor(sizes=tuple(t.shape), dtype=str(t.dtype).removeprefix("torch."))


def _tensors(values: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    if isinstance(values, torch.Tensor):
        found.append(values)
    elif isinstance(values, (list, tuple)):
        for v in values:
            found.extend(_tensors(v))
    return found


# Ops whose schema carries no alias annotation but which only rewrite tensor metadata: no kernel runs.
_METADATA_ONLY_OPS = {
    "aten._unsafe_view.default",
    "aten._reshape_alias.default",
    "aten.alias.default",
    "aten.lift_fresh.default",
    "aten.detach.default",
}


def _is_view(func: Any) -> bool:
    if str(func) in _METADATA_ONLY_OPS:
        return True
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def arg_layout(func: Any, args: tuple, kwargs: dict) -> str:
    """One letter per schema argument: t tensor, n absent, s scalar, or a list "l" followed by t/n
    per element (a tensor, or None as in `x[None, idx]`).

    The profiler rebuilds the call from this, the input tensors (in order) and the scalars."""
    letters = []
    for index, argument in enumerate(func._schema.arguments):
        if index < len(args):
            value = args[index]
        elif argument.name in kwargs:
            value = kwargs[argument.name]
        else:
            letters.append("n")
            continue
        if isinstance(value, torch.Tensor):
            letters.append("t")
        elif isinstance(value, (list, tuple)) and _tensors(value):
            letters.append("l" + "".join("t" if isinstance(v, torch.Tensor) else "n" for v in value))
        elif value is None:
            letters.append("n")
        else:
            letters.append("s")
    return ".".join(letters)


def _scalar_args(func: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Non-tensor arguments by their schema name: they change what a kernel does (dims, eps, dtype)."""
    scalars: dict[str, Any] = {}
    schema_args = func._schema.arguments
    for index, value in enumerate(args):
        name = schema_args[index].name if index < len(schema_args) else f"arg{index}"
        _maybe_scalar(scalars, name, value)
    for name, value in kwargs.items():
        _maybe_scalar(scalars, name, value)
    return scalars


def _maybe_scalar(scalars: dict[str, Any], name: str, value: Any) -> None:
    if value is None or isinstance(value, torch.Tensor) or _tensors(value):
        return
    if isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        if isinstance(value, torch.device):
            return  # where it runs is the platform's business, not the signature's
        scalars[name] = str(value).removeprefix("torch.")
    elif isinstance(value, (bool, int, float, str, torch.SymInt, torch.SymFloat, torch.SymBool)):
        scalars[name] = value
    elif isinstance(value, (list, tuple)):
        scalars[name] = list(value)


class ModuleStack:
    """Which module is running, via global forward hooks, with names from `named_modules()`."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.names = {id(m): name for name, m in model.named_modules()}
        self.stack: list[str] = []
        self._handles: list[Any] = []

    def current(self) -> str:
        return self.stack[-1] if self.stack else ""

    def __enter__(self) -> ModuleStack:
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        def pre(module: torch.nn.Module, _args: Any) -> None:
            self.stack.append(self.names.get(id(module), self.current()))

        def post(module: torch.nn.Module, _args: Any, _out: Any) -> None:
            if self.stack:
                self.stack.pop()

        self._handles = [register_module_forward_pre_hook(pre), register_module_forward_hook(post)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class OpRecorder(TorchDispatchMode):
    """Records every aten op dispatched while active, in execution order."""

    def __init__(self, modules: ModuleStack) -> None:
        super().__init__()
        self.modules = modules
        self.events: list[RawEvent] = []
        self._attention_depth = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func)
        if name in _METADATA_OPS or name.startswith("prim."):
            return out
        if self._attention_depth:
            kind = KIND_INNER
        else:
            kind = KIND_VIEW if _is_view(func) else KIND_KERNEL
        self.events.append(
            RawEvent(
                op=name,
                kind=kind,
                module=self.modules.current(),
                inputs=[_raw(t) for t in _tensors(list(args) + list(kwargs.values()))],
                outputs=[_raw(t) for t in _tensors(out)],
                scalars=_scalar_args(func, args, kwargs),
                layout=arg_layout(func, args, kwargs),
            )
        )
        return out

    def record_composite(self, event: RawEvent) -> None:
        self.events.append(event)

    @contextlib.contextmanager
    def inside_attention(self) -> Iterator[None]:
        self._attention_depth += 1
        try:
            yield
        finally:
            self._attention_depth -= 1


# Attention-module attributes that change the attention kernel's work, recorded as scalars.
_ATTENTION_ATTRIBUTES = ("sliding_window", "attn_logit_softcapping", "is_causal")
_ATTENTION_KWARGS = ("sliding_window", "softcap", "dropout")


@contextlib.contextmanager
def capture_attention(recorder: OpRecorder, backend: str) -> Iterator[None]:
    """Wrap the engine's registered attention function for `backend`, so each call is recorded as
    one operation: what the engine dispatches to, with its q/k/v/mask and the layer's read/write
    indices (their sizes carry the request's KV length)."""
    from transformers.modeling_utils import AttentionInterface

    mapping = AttentionInterface._global_mapping
    if backend not in mapping:
        raise KeyError(backend)
    # transformers types its registry's values as `function`, which mypy does not treat as callable.
    original = cast(Callable[..., Any], mapping[backend])

    def wrapper(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, *args: Any, **kwargs: Any) -> Any:
        with recorder.inside_attention():
            out = original(module, query, key, value, attention_mask, *args, **kwargs)
        inputs = [query, key, value] + ([attention_mask] if isinstance(attention_mask, torch.Tensor) else [])
        cache = kwargs.get("cache")
        if cache is not None and "read_index" in kwargs:
            group, _ = cache.layer_index_to_group_indices[module.layer_idx]
            inputs += [kwargs["read_index"][group], kwargs["write_index"][group]]
        scalars: dict[str, Any] = {"scaling": float(kwargs.get("scaling") or getattr(module, "scaling", None) or 0.0)}
        for attr in _ATTENTION_ATTRIBUTES:
            attr_value = getattr(module, attr, None)
            if attr_value is not None:
                scalars[attr] = attr_value
        for name in _ATTENTION_KWARGS:
            if kwargs.get(name) is not None:
                scalars[name] = kwargs[name]
        recorder.record_composite(
            RawEvent(
                op="attention",
                kind=KIND_ATTENTION,
                module=recorder.modules.current(),
                inputs=[_raw(t) for t in inputs],
                outputs=[_raw(t) for t in _tensors(out[0])],
                scalars=scalars,
                backend=backend,
            )
        )
        return out

    mapping[backend] = wrapper
    try:
        yield
    finally:
        mapping[backend] = original


@contextlib.contextmanager
def capture_collectives(recorder: OpRecorder, model: torch.nn.Module, tp_plan: dict[str, str],
                        world_size: int = 1) -> Iterator[None]:
    """Record the collective each tensor-parallel module would issue after its forward.

    The plan is transformers' own `base_model_tp_plan` / `_tp_plan` for the architecture: rowwise
    layers produce partial sums (all_reduce), gathered outputs are all_gathered over the vocab.
    The world size is a scalar of the record, so it is part of the collective's signature (an
    all_reduce over 2 ranks is another measurement than one over 4).
    """
    import fnmatch

    handles = []
    for name, module in model.named_modules():
        style = _plan_style(name, tp_plan, fnmatch)
        if style is None:
            continue
        kind = _COLLECTIVE_FOR_STYLE.get(style)
        if kind is None:
            continue

        def hook(mod: Any, _args: Any, out: Any, kind: str = kind, name: str = name) -> None:
            tensors = _tensors(out if not hasattr(out, "logits") else out.logits)
            if not tensors:
                return
            recorder.record_composite(
                RawEvent(
                    op=f"collective.{kind}",
                    kind=KIND_COLLECTIVE,
                    module=name,
                    inputs=[_raw(tensors[0])],
                    outputs=[_raw(tensors[0])],
                    scalars={"collective": kind, "world_size": world_size},
                )
            )

        handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


_COLLECTIVE_FOR_STYLE = {
    "rowwise": "all_reduce",
    "rowwise_split_input": "all_reduce",
    "moe_tp_experts": "all_reduce",
    "colwise_gather_output": "all_gather",
    "embedding": "all_reduce",
}


def _plan_style(name: str, tp_plan: dict[str, str], fnmatch: Any) -> str | None:
    for pattern, style in tp_plan.items():
        if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "model." + pattern):
            return style
    return None


@contextlib.contextmanager
def capture_module_attention(
    recorder: OpRecorder,
    modules: list[torch.nn.Module],
    backend: str,
    metadata_of: Any,
    scalars_of: Any,
) -> Iterator[None]:
    """Record each call of these attention modules (vLLM's `Attention` layers: KV cache write plus
    the backend's kernel) as one operation: q, k, v and the per-sequence / per-token metadata
    tensors the backend's builder made (`metadata_of(module)`); the ops inside are kept as inner."""
    handles = []

    def enter(module: Any, _args: Any) -> None:
        recorder._attention_depth += 1

    def leave(module: Any, args: tuple, out: Any) -> None:
        recorder._attention_depth -= 1
        tensors = [a for a in args[:3] if isinstance(a, torch.Tensor)] + list(metadata_of(module))
        recorder.record_composite(
            RawEvent(
                op="attention",
                kind=KIND_ATTENTION,
                module=recorder.modules.names.get(id(module), recorder.modules.current()),
                inputs=[_raw(t) for t in tensors],
                outputs=[_raw(t) for t in _tensors(out)],
                scalars=dict(scalars_of(module)),
                backend=backend,
            )
        )

    for module in modules:
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()

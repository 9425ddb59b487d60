"""`paged|flex_attention`: transformers' paged KV cache with torch's flex attention (profile only).

transformers 5.17 registers paged attention functions for sdpa, eager and flash only; its
continuous-batching engine cannot run flex attention. To price flex attention on a platform anyway
(the issue: profile every backend the H100 has), Dooly registers this function under
`paged|flex_attention`. It treats the paged cache exactly as the engine's `paged|sdpa` function
does (this step's K/V written, the batch's K/V read back, through `PagedAttentionCache.update` with
the layer's read and write indices), so what is timed differs from `paged|sdpa` only in the
attention kernel. The packed block-diagonal causal mask that `paged|sdpa` receives as a dense 4D
tensor is expressed here as a flex `BlockMask` built from the step's cumulative sequence lengths
(`cu_seq_lens_q`, `cu_seq_lens_k`, which the engine's IO buffers hand every attention backend),
with the cache's sliding window where the layer has one; grouped-query heads are flex's
`enable_gqa`.

Where it runs:
- Under a FakeTensorMode (the tracer), only the output's shape is made: nothing is compiled or
  launched, and the call is recorded as one attention operation like any backend's.
- On CUDA, flex is compiled with dynamic shapes (a fused kernel; eager flex materialises the whole
  score matrix). Dynamo still compiles a few variants per attention signature, where it
  specialises a size of 1 (one query token, one 128-token mask block) or the inputs' view
  structure (a prefill-only step hands over this step's K/V, others the cache's read-back): six
  per layer kind over a reduced attention grid, counted on the CPU with dynamo's own guards and a
  counting backend. Running out of recompiles raises instead of silently timing eager flex.
- On the CPU (tests, demos), eager flex: on torch 2.13 inductor's CPU flex kernel fails to compile
  with dynamic shapes when the mask reads the sequence-id tensors, and a static compile costs
  seconds per batch shape.

One BlockMask serves every layer of a step, as the 4D mask does: it is cached by the identity and
version of the step's cu_seq_lens tensors, so a timed call measures the kernel, not the mask.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

BACKEND = "paged|flex_attention"
FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
# The paged cache's per-layer window for a full-attention layer (`PagedAttentionCache.sliding_windows`).
FULL_WINDOW = 1
# Dynamo keeps every compiled variant of flex on one code object: a few per attention signature
# (dynamic shapes, plus size-1 specialisations), and one profiling run holds many signatures.
RECOMPILE_LIMIT = 256
# Block masks kept: the full and the sliding mask of the step in flight, and of the one before.
BLOCK_MASK_CACHE_ENTRIES = 4
_EAGER_FLEX_WARNING = "flex_attention called without torch.compile"


def register() -> None:
    """Make `paged|flex_attention` a registered attention implementation (idempotent): models are
    then built with it like with any engine backend, and the tracer and profiler find it where they
    find `paged|sdpa`."""
    from transformers.modeling_utils import AttentionInterface

    if AttentionInterface._global_mapping.get(BACKEND) is not paged_flex_attention_forward:
        AttentionInterface.register(BACKEND, paged_flex_attention_forward)


def paged_flex_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """One layer's attention over a continuous-batching step: the paged cache updated and read as
    `paged|sdpa` does, then flex attention under the step's packed causal block mask.

    query: [1, heads, T, head_dim]; key/value: [1, kv_heads, T, head_dim] (this step's tokens).
    Returns ([1, T, heads, v_head_dim], None), the layout and dtype `paged|sdpa` returns."""
    cache = kwargs.pop("cache", None)
    if cache is None:
        raise ValueError(f"`{BACKEND}` needs the paged cache and packed inputs of continuous batching")
    if dropout:
        raise ValueError(f"`{BACKEND}` is an inference backend: dropout {dropout} is not supported")
    if hasattr(module, "sinks") or "s_aux" in kwargs:
        raise ValueError(f"`{BACKEND}` does not implement attention sinks")
    key, value = cache.update(
        key_states=key,
        value_states=value,
        layer_idx=module.layer_idx,
        read_index=kwargs["read_index"],
        write_index=kwargs["write_index"],
    )
    key = key.transpose(0, 1).unsqueeze(0)
    value = value.transpose(0, 1).unsqueeze(0)
    batch, heads, q_len, _ = query.shape
    if _shape_only(query):
        return query.new_empty((batch, q_len, heads, value.shape[-1])), None
    window = cache.sliding_windows[module.layer_idx]
    block_mask = _BLOCK_MASKS.get(
        kwargs["cu_seq_lens_q"], layer_seq_lens(kwargs["cu_seq_lens_k"], window), q_len, key.shape[2], window
    )
    output = run_flex(
        query,
        key,
        value,
        block_mask=block_mask,
        scale=scaling,
        score_mod=softcap_score_mod(kwargs.get("softcap")),
        enable_gqa=heads != key.shape[1],
    )
    return output.transpose(1, 2).contiguous(), None


def layer_seq_lens(cu_seq_lens_k: torch.Tensor | dict[str, torch.Tensor], window: int) -> torch.Tensor:
    """The cumulative key lengths of this layer's kind: the engine keys them by layer type when a
    model mixes full and sliding layers (a sliding layer reads at most window - 1 past tokens)."""
    if isinstance(cu_seq_lens_k, dict):
        return cu_seq_lens_k[FULL_ATTENTION if window == FULL_WINDOW else SLIDING_ATTENTION]
    return cu_seq_lens_k


def packed_block_mask(cu_seq_lens_q: torch.Tensor, cu_seq_lens_k: torch.Tensor, q_len: int, kv_len: int,
                      window: int = FULL_WINDOW) -> Any:
    """The engine's packed mask as a flex BlockMask, built by torch's `create_block_mask`.

    Sequence i owns queries cu_seq_lens_q[i]:cu_seq_lens_q[i+1] and keys cu_seq_lens_k[i]:
    cu_seq_lens_k[i+1]; its queries are its last tokens, so a query sees the keys of its own
    sequence up to its own position (and, with a window, fewer than `window` positions back): the
    mask `build_attention_mask` writes as a 4D tensor for `paged|sdpa`. The sequence of every
    token is found on the device from the cumulative lengths (searchsorted), not from host lists."""
    from torch.nn.attention.flex_attention import create_block_mask

    device = cu_seq_lens_q.device
    last_q = cu_seq_lens_q.numel() - 2
    last_k = cu_seq_lens_k.numel() - 2
    q_tokens = torch.arange(q_len, device=device, dtype=cu_seq_lens_q.dtype)
    k_tokens = torch.arange(kv_len, device=device, dtype=cu_seq_lens_k.dtype)
    q_seq = torch.searchsorted(cu_seq_lens_q[1:], q_tokens, right=True).clamp_(max=last_q)
    k_seq = torch.searchsorted(cu_seq_lens_k[1:], k_tokens, right=True).clamp_(max=last_k)
    # Each query's own position as an index into the packed keys (its sequence ends both lists).
    q_at = q_tokens + (cu_seq_lens_k[1:] - cu_seq_lens_q[1:])[q_seq]

    def causal(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return (q_seq[q_idx] == k_seq[kv_idx]) & (kv_idx <= q_at[q_idx])

    def sliding(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return causal(b, h, q_idx, kv_idx) & (q_at[q_idx] - kv_idx < window)

    mask_mod = causal if window == FULL_WINDOW else sliding
    return create_block_mask(mask_mod, None, None, q_len, kv_len, device=device)


class BlockMaskCache:
    """Block masks by step: keyed by the address, shape and version counter of the step's
    cu_seq_lens tensors (the engine refills the same buffers every step, which bumps their
    version), holding references to them so no other tensor can take their memory while keyed."""

    def __init__(self, entries: int = BLOCK_MASK_CACHE_ENTRIES) -> None:
        self.entries = entries
        self._masks: OrderedDict[tuple, tuple[Any, tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.built = 0

    def get(self, cu_seq_lens_q: torch.Tensor, cu_seq_lens_k: torch.Tensor, q_len: int, kv_len: int,
            window: int) -> Any:
        key = _step_key(cu_seq_lens_q, cu_seq_lens_k, q_len, kv_len, window)
        if key is not None and key in self._masks:
            self._masks.move_to_end(key)
            return self._masks[key][0]
        mask = packed_block_mask(cu_seq_lens_q, cu_seq_lens_k, q_len, kv_len, window)
        self.built += 1
        if key is not None:
            self._masks[key] = (mask, (cu_seq_lens_q, cu_seq_lens_k))
            while len(self._masks) > self.entries:
                self._masks.popitem(last=False)
        return mask

    def clear(self) -> None:
        self._masks.clear()


def _step_key(cu_seq_lens_q: torch.Tensor, cu_seq_lens_k: torch.Tensor, q_len: int, kv_len: int,
              window: int) -> tuple | None:
    try:
        tensors = tuple((t.data_ptr(), tuple(t.shape), t._version) for t in (cu_seq_lens_q, cu_seq_lens_k))
    except RuntimeError:  # inference-mode tensors keep no version counter: build every time
        return None
    return (*tensors, str(cu_seq_lens_q.device), q_len, kv_len, window)


_BLOCK_MASKS = BlockMaskCache()


def run_flex(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **options: Any) -> torch.Tensor:
    """flex_attention as this device runs it best (see the module docstring): compiled on CUDA,
    eager elsewhere. A compiled flex that ran out of recompiles is an error, not a slow number."""
    if query.device.type != "cuda":
        from torch.nn.attention.flex_attention import flex_attention

        _note_eager(query.device.type)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_EAGER_FLEX_WARNING)
            return flex_attention(query, key, value, **options)
    import torch._dynamo

    with torch._dynamo.config.patch(_recompile_settings()):
        try:
            return _compiled_flex()(query, key, value, **options)
        except torch._dynamo.exc.FailOnRecompileLimitHit as exc:
            raise RuntimeError(f"compiled flex attention ran out of recompiles: {exc}") from exc


def forget_compiled() -> None:
    """Drop every compiled flex variant and cached block mask: a new model's attention shapes
    never reuse a previous model's, and one profiling run over many models would otherwise pile
    their variants onto one code object until RECOMPILE_LIMIT fails the rest."""
    _BLOCK_MASKS.clear()
    if _compiled_flex.cache_info().currsize:
        import torch._dynamo

        torch._dynamo.reset()
        _compiled_flex.cache_clear()


@functools.cache
def _compiled_flex() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def _recompile_settings() -> dict[str, Any]:
    import torch._dynamo

    wanted = {"recompile_limit": RECOMPILE_LIMIT, "accumulated_recompile_limit": RECOMPILE_LIMIT,
              "fail_on_recompile_limit_hit": True}
    return {name: value for name, value in wanted.items() if hasattr(torch._dynamo.config, name)}


@functools.cache
def _note_eager(device_type: str) -> None:
    log.info("%s on %s runs torch's eager (unfused) flex_attention", BACKEND, device_type)


@functools.cache
def softcap_score_mod(softcap: float | None) -> Callable[..., Any] | None:
    """Logit soft-capping (gemma-2) as a flex score_mod, one function per value so a compiled
    flex sees the same callable every call. `paged|sdpa` and `paged|eager` drop it; a flex
    backend applies it, as transformers' own `flex_attention` does, so it is priced here."""
    if not softcap:
        return None

    def score_mod(score: torch.Tensor, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> torch.Tensor:
        return softcap * torch.tanh(score / softcap)

    return score_mod


def _shape_only(tensor: torch.Tensor) -> bool:
    """Tracing: fake or meta tensors carry shapes, nothing to compute or compile."""
    from torch._subclasses.fake_tensor import is_fake

    return tensor.device.type == "meta" or is_fake(tensor)

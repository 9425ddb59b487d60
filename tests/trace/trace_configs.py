"""Tiny configs for tracer tests: real architectures, sizes small enough to run concretely too."""

import json
from pathlib import Path


def write_config(directory: Path, name: str, payload: dict) -> Path:
    path = directory / f"{name}.json"
    path.write_text(json.dumps(payload))
    return path


TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 256,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}

# Numbers that collide on purpose with the traced mixed batch (B = 4 sequences, prefill chunks of
# 7 and 6 tokens): layers = heads = B = 2 * kv heads, head_dim = a chunk length.
COLLIDING_LLAMA = {
    **TINY_LLAMA,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 4,
    "head_dim": 6,
    "hidden_size": 24,
    "intermediate_size": 48,
}

TINY_MIXTRAL = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 256,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 4096,
}

TINY_GEMMA2 = {
    "architectures": ["Gemma2ForCausalLM"],
    "model_type": "gemma2",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_hidden_layers": 4,
    "vocab_size": 256,
    "sliding_window": 24,
    "query_pre_attn_scalar": 32,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "max_position_embeddings": 4096,
}



# A starcoder2-like decoder (GELU MLP with biases, LayerNorm, sliding window): its probe's window
# switches the decode step's code path unless the tracer probes around it.
TINY_STARCODER2 = {
    "architectures": ["Starcoder2ForCausalLM"],
    "model_type": "starcoder2",
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 256,
    "sliding_window": 4096,
    "max_position_embeddings": 16384,
    "use_bias": True,
    "norm_epsilon": 1e-5,
    "hidden_act": "gelu_pytorch_tanh",
    "bos_token_id": 0,
    "eos_token_id": 0,
}

# A Qwen1.5-MoE-like decoder (router + shared expert with a sigmoid gate): op classes no dense
# model runs.
TINY_QWEN2_MOE = {
    "architectures": ["Qwen2MoeForCausalLM"],
    "model_type": "qwen2_moe",
    "hidden_size": 64,
    "intermediate_size": 160,
    "moe_intermediate_size": 48,
    "shared_expert_intermediate_size": 160,
    "num_experts": 6,
    "num_experts_per_tok": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "num_hidden_layers": 2,
    "vocab_size": 256,
    "max_position_embeddings": 4096,
    "decoder_sparse_step": 1,
    "norm_topk_prob": False,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
}

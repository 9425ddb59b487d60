"""Small configs and a small grid so profiling runs in seconds on a 2-core CPU."""

import json
from pathlib import Path

MODEL_A = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 256,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}
# Same attention and hidden size as A, another MLP width: only the MLP signatures are new.
MODEL_B = {**MODEL_A, "intermediate_size": 224, "num_hidden_layers": 3}

SMALL_GRID_ARGS = ["--max-tokens", "16", "--max-seqs", "4", "--max-kv", "512", "--max-context", "128"]


def write_model(directory: Path, name: str, payload: dict) -> str:
    path = directory / f"{name}.json"
    path.write_text(json.dumps(payload))
    return str(path)

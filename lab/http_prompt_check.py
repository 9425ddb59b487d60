"""Does `transformers serve`, as `dooly bench --client http` starts it, see the prompts the client sends?

An H100 HTTP cell's server steps (Qwen2.5-7B heavy) prefilled 0 tokens per request while the client
sent 256-2048-token prompts; on this machine's CPU the same client and launcher prefill every prompt
token. This checks, where it runs, each link of the chain: the package versions, the saved
word-level tokenizer as the server loads it (AutoProcessor, as transformers' model manager does),
and a tiny model served through `dooly bench --client http` on each device given, with the server's
engine steps compared against the prompts sent.

    python lab/http_prompt_check.py --devices cpu,cuda --out /tmp/http-check
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger("http_prompt_check")

# A vocabulary as large as Qwen2.5's, on the tiny Llama the tests serve.
VOCAB = 152064
PROMPT_TOKENS = 1868
SEED = 0
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": VOCAB,
    "tie_word_embeddings": False, "torch_dtype": "float32",
}
WORKLOAD = ["--requests", "3", "--rate", "20", "--prompt-len", "uniform:600:900", "--output-len", "uniform:3:5",
            "--seed", "4"]
SETTINGS = ["--set", "num_blocks=64", "--set", "block_size=64", "--set", "max_batch_tokens=512"]


def versions() -> dict[str, str]:
    import importlib.metadata as md

    names = ("transformers", "tokenizers", "torch", "fastapi", "pydantic", "openai", "uvicorn", "starlette")
    found = {}
    for name in names:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = "absent"
    return found


def tokenizer_round_trip() -> dict[str, object]:
    from transformers import AutoProcessor

    from dooly.engines.word_tokenizer import build_tokenizer, prompt_text

    ids = np.random.default_rng(SEED).integers(3, VOCAB, size=PROMPT_TOKENS).tolist()
    with tempfile.TemporaryDirectory() as directory:
        build_tokenizer(VOCAB).save_pretrained(directory)
        processor = AutoProcessor.from_pretrained(directory)
        tokenizer = getattr(processor, "tokenizer", processor)
        encoded = tokenizer(prompt_text(ids), return_tensors=None)["input_ids"]
    return {"processor": type(processor).__name__, "sent": len(ids), "tokenized": len(encoded),
            "identical": encoded == ids}


def served(device: str, work: Path) -> dict[str, object]:
    """A tiny model through `dooly bench --client http` on `device`: prompt tokens sent against the
    tokens the server's engine prefilled."""
    import pyarrow.parquet as pq

    config = work / "config.json"
    config.write_text(json.dumps(TINY_LLAMA))
    out = work / f"gt-{device}"
    command = [sys.executable, "-m", "dooly.cli", "bench", str(config), "--client", "http", "--device", device,
               "--dtype", "float32", "--warmup-requests", "1", "--out", str(out), *SETTINGS, *WORKLOAD,
               "--output", "json"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"exit": done.returncode, "stderr": done.stderr[-2000:]}
    steps = pq.read_table(out / "steps.parquet", columns=["prefill", "decode_ctx"]).to_pylist()
    prefilled = sum(chunk["q"] for step in steps for chunk in step["prefill"])
    sent = sum(pq.read_table(out / "requests.parquet", columns=["prompt_tokens"]).column(0).to_pylist())
    return {"exit": 0, "prompt_tokens_sent": sent, "prefilled": prefilled, "first_steps": steps[:4]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="cpu", help="comma-separated: cpu, cuda")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, object] = {"versions": versions(), "tokenizer": tokenizer_round_trip()}
    for device in args.devices.split(","):
        report[f"served_{device}"] = served(device, args.out)
        log.info("%s: %s", device, report[f"served_{device}"])
    (args.out / "http_prompt_check.json").write_text(json.dumps(report, indent=2, default=str))
    log.info("%s", json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()

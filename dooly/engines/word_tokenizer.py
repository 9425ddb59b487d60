"""The served model's word-level tokenizer: token id `i` is the word `t{i}`.

A prompt of N ids is N words and tokenizes back to exactly those N ids, so an HTTP server sees the
prompts the in-process harness adds, and every generated id decodes to one non-empty word (one
streamed chunk per token). Both the HTTP client (`dooly.engines.http_bench`), which saves it beside
the model, and the server launcher (`dooly.engines.serve_launcher`), which hands it to the
handlers, use it from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# Token id i is the word t{i}: whitespace-split, one word per id, no special tokens (so none is
# skipped when the server detokenizes a streamed token).
TOKEN_WORD_PREFIX = "t"
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }} {% endfor %}"
# The probe prompt the launcher tokenizes with the handlers' tokenizer: ids spread over the vocabulary.
TOKENIZER_PROBE_TOKENS = 64
FIRST_PROBE_TOKEN = 1


def token_word(token_id: int) -> str:
    return f"{TOKEN_WORD_PREFIX}{token_id}"


def prompt_text(token_ids: list[int]) -> str:
    """The text the word-level tokenizer turns back into exactly `token_ids`."""
    return " ".join(token_word(i) for i in token_ids)


def load_word_tokenizer(directory: Path) -> Any:
    """The word-level tokenizer `save_served_model` saved, loaded by its own class: AutoProcessor
    would pick the model type's tokenizer class, which may not read it as a word-level one."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(directory))


def tokenizer_round_trips(tokenizer: Any, vocab_size: int) -> bool:
    """Whether a probe prompt spread over the whole vocabulary tokenizes back to its ids."""
    ids = np.linspace(FIRST_PROBE_TOKEN, vocab_size - 1, num=TOKENIZER_PROBE_TOKENS, dtype=np.int64).tolist()
    encoded = tokenizer(prompt_text(ids), return_tensors=None)["input_ids"]
    return list(encoded) == ids


def build_tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer over the model's whole vocabulary: ids round-trip through text, every
    generated id decodes to a non-empty word (so each token is one streamed chunk), no hub access."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token_word(i): i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=token_word(0)))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, chat_template=CHAT_TEMPLATE)

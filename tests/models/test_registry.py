"""The bundled configs are the real models (parameter counts) and bad configs fail clearly."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from dooly.errors import DoolyError
from dooly.models.registry import (
    ModelSpec,
    build_hf_config,
    bundled_model_ids,
    model_key,
    resolve_model,
)

# Published parameter counts, in billions (model cards / Hugging Face "Model size").
PUBLISHED_BILLIONS = {
    "meta-llama/Llama-3.1-8B": 8.03,
    "meta-llama/Llama-3.1-70B": 70.6,
    "meta-llama/Llama-3.2-1B": 1.24,
    "meta-llama/Llama-3.2-3B": 3.21,
    "mistralai/Mistral-7B-v0.3": 7.25,
    "Qwen/Qwen2.5-7B": 7.62,
    "Qwen/Qwen2.5-14B": 14.7,
    "Qwen/Qwen2.5-32B": 32.8,
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": 7.62,
    "mistralai/Mixtral-8x7B-v0.1": 46.7,
    "google/gemma-2-9b": 9.24,
    "microsoft/Phi-3-mini-4k-instruct": 3.82,
    "CohereLabs/c4ai-command-r7b-12-2024": 8.03,
    "Qwen/Qwen2.5-0.5B": 0.494,
    "Qwen/Qwen2.5-1.5B": 1.54,
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": 1.78,
}
PARAM_TOLERANCE = 0.02


def _parameter_count(config) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def test_bundled_ids_are_the_supported_models():
    assert set(bundled_model_ids()) == set(PUBLISHED_BILLIONS)


@pytest.mark.parametrize("model_id", sorted(PUBLISHED_BILLIONS))
def test_bundled_model_builds_with_its_published_size(model_id):
    spec = resolve_model(model_id)
    assert spec.model_id == model_id
    assert spec.source == "bundled"
    config = build_hf_config(spec)
    assert config.architectures == spec.config["architectures"]
    billions = _parameter_count(config) / 1e9
    assert abs(billions / PUBLISHED_BILLIONS[model_id] - 1) < PARAM_TOLERANCE, billions


@pytest.mark.parametrize("text", ["llama-3.1-8b", "META-LLAMA/LLAMA-3.1-8B", " Llama-3.1-8B "])
def test_bundled_names_match_any_case_and_without_organisation(text):
    assert resolve_model(text).model_id == "meta-llama/Llama-3.1-8B"


def test_config_file_and_directory_resolve(write_config, small_llama):
    path = write_config(small_llama, "snap/tiny-llama/config.json")
    by_file = resolve_model(str(path))
    by_dir = resolve_model(str(path.parent))
    assert by_file.config == by_dir.config == small_llama
    assert by_file.model_id == by_dir.model_id == "tiny-llama"
    assert by_file.source == by_dir.source == str(path)
    config = build_hf_config(by_dir)
    assert (config.hidden_size, config.num_key_value_heads, config.head_dim) == (256, 2, 32)


def test_config_file_with_other_name_is_named_by_its_stem(write_config, small_llama):
    path = write_config(small_llama, "custom-7b.json")
    assert resolve_model(str(path)).model_id == "custom-7b"


def test_architectures_alone_give_the_model_type(write_config, small_llama):
    del small_llama["model_type"]
    config = build_hf_config(resolve_model(str(write_config(small_llama))))
    assert config.model_type == "llama"


def test_overrides_replace_fields_and_keep_layer_kinds(write_config):
    spec = resolve_model("google/gemma-2-9b")
    assert build_hf_config(spec, num_hidden_layers=3).num_hidden_layers == 3
    listed = {
        "model_type": "gemma2",
        "architectures": ["Gemma2ForCausalLM"],
        "num_hidden_layers": 4,
        "layer_types": [
            "full_attention",
            "sliding_attention",
            "sliding_attention",
            "full_attention",
        ],
    }
    shortened = build_hf_config(resolve_model(str(write_config(listed))), num_hidden_layers=2)
    assert shortened.layer_types == ["full_attention", "sliding_attention"]


def test_model_key_follows_facts_not_files(write_config):
    bundled = resolve_model("meta-llama/Llama-3.1-8B")
    copy = dict(bundled.config)
    copy["_source"] = "somewhere else"
    copy["transformers_version"] = "9.9.9"
    copied = resolve_model(str(write_config(copy)))
    assert model_key(copied) == model_key(bundled)
    assert re.fullmatch(r"[0-9a-f]{12}", model_key(bundled))
    changed = ModelSpec(bundled.model_id, {**bundled.config, "intermediate_size": 14335}, "bundled")
    assert model_key(changed) != model_key(bundled)
    keys = {model_key(resolve_model(model_id)) for model_id in bundled_model_ids()}
    assert len(keys) == len(bundled_model_ids())


def test_building_leaves_the_spec_untouched():
    spec = resolve_model("meta-llama/Llama-3.1-8B")
    before = (json.dumps(spec.config, sort_keys=True), model_key(spec))
    build_hf_config(spec, num_hidden_layers=1)
    assert (json.dumps(spec.config, sort_keys=True), model_key(spec)) == before


def test_hand_made_spec_without_identity_is_refused():
    with pytest.raises(DoolyError, match="neither `model_type` nor `architectures`"):
        build_hf_config(ModelSpec("hand-made", {"hidden_size": 64}, "test"))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DoolyError, match="no such file"):
        resolve_model(str(tmp_path / "absent.json"))
    with pytest.raises(DoolyError, match="holds no config.json"):
        resolve_model(str(tmp_path))


def test_malformed_json_names_line_and_column(write_config):
    path = write_config('{\n  "model_type": "llama",\n  "hidden_size": 4096,,\n}')
    with pytest.raises(DoolyError, match=r"line 3, column 23") as caught:
        resolve_model(str(path))
    assert "\n" not in str(caught.value)


def test_non_object_json_is_refused(write_config):
    with pytest.raises(DoolyError, match="JSON object"):
        resolve_model(str(write_config("[1, 2]")))


def test_unknown_name_suggests_close_bundled_names():
    with pytest.raises(DoolyError, match="Llama-3.1-8B") as caught:
        resolve_model("meta-llama/Llama-3.1-9B")
    assert "unknown model" in str(caught.value)
    with pytest.raises(DoolyError, match="dooly models"):
        resolve_model("zzzzzz")


def test_config_without_identity_is_refused(write_config, small_llama):
    del small_llama["model_type"], small_llama["architectures"]
    with pytest.raises(DoolyError, match="model_type.*architectures"):
        resolve_model(str(write_config(small_llama)))


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"architectures": ["LlamaForSpaceTravel"]}, "LlamaForSpaceTravel"),
        ({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, "BertForMaskedLM"),
        ({"model_type": "qwen2"}, "do not match model_type 'qwen2'"),
        ({"model_type": "no-such-type"}, "no-such-type"),
    ],
)
def test_unknown_or_non_causal_architecture(write_config, small_llama, changes, expected):
    small_llama.update(changes)
    with pytest.raises(DoolyError, match=re.escape(expected)):
        build_hf_config(resolve_model(str(write_config(small_llama))))


@pytest.mark.parametrize(
    ("changes", "field", "value"),
    [
        ({"hidden_size": 0}, "hidden_size", "0"),
        ({"num_attention_heads": -8}, "num_attention_heads", "-8"),
        ({"num_key_value_heads": 0}, "num_key_value_heads", "0"),
        ({"num_hidden_layers": 0}, "num_hidden_layers", "0"),
        ({"vocab_size": -1}, "vocab_size", "-1"),
        ({"intermediate_size": 0}, "intermediate_size", "0"),
        ({"hidden_size": "4096"}, "hidden_size", "'4096'"),
        ({"num_hidden_layers": 2.5}, "num_hidden_layers", "2.5"),
        ({"hidden_size": 250}, "num_attention_heads", "250"),
        ({"num_key_value_heads": 3}, "num_key_value_heads", "3"),
    ],
)
def test_nonsense_shape_values_name_the_field(write_config, small_llama, changes, field, value):
    small_llama.update(changes)
    with pytest.raises(DoolyError) as caught:
        build_hf_config(resolve_model(str(write_config(small_llama))))
    message = str(caught.value)
    assert field in message and value in message and "\n" not in message


def test_explicit_head_dim_allows_indivisible_hidden(write_config, small_llama):
    small_llama.update(
        model_type="mistral", architectures=["MistralForCausalLM"], hidden_size=250, head_dim=32
    )
    assert build_hf_config(resolve_model(str(write_config(small_llama)))).head_dim == 32


def test_more_experts_per_token_than_experts(write_config):
    spec = resolve_model("mistralai/Mixtral-8x7B-v0.1")
    copy = {**spec.config, "num_experts_per_tok": 9}
    with pytest.raises(DoolyError, match=r"num_experts_per_tok 9 exceeds num_local_experts 8"):
        build_hf_config(resolve_model(str(write_config(copy))))
    with pytest.raises(DoolyError, match="num_local_experts"):
        build_hf_config(spec, num_local_experts=0)


def test_transformers_rejection_is_one_line(write_config):
    listed = {
        "model_type": "gemma2",
        "architectures": ["Gemma2ForCausalLM"],
        "num_hidden_layers": 2,
        "layer_types": ["sliding_attention", "bogus_attention"],
    }
    with pytest.raises(DoolyError, match="transformers rejects") as caught:
        build_hf_config(resolve_model(str(write_config(listed))))
    assert "\n" not in str(caught.value)


def test_bundled_files_carry_their_source():
    for model_id in bundled_model_ids():
        assert "huggingface.co/" + model_id in resolve_model(model_id).config["_source"]
        json.dumps(resolve_model(model_id).config)

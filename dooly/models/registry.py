"""Model configurations: the bundled config.json facts, user config files, and validation.

Dooly never needs weights: every shape it traces or profiles follows from a model's config.json.
This module finds that config (a bundled Hugging Face id, a file, or a snapshot directory), turns
it into transformers' own config object, and refuses nonsense with one line naming the field, so
a typo in a config never surfaces later as a shape error deep inside a traced forward pass.

Heavy imports (transformers, and through it torch) happen inside the functions that need them,
so `dooly --help` and `dooly models --help` stay fast.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dooly.errors import DoolyError
from dooly.models.hf_imports import import_transformers_lean, share_import_structure_scans
from dooly.models.validation import check_required_fields

if TYPE_CHECKING:
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

BUNDLED_SOURCE = "bundled"
CONFIG_FILENAME = "config.json"
# A bundled file is named after the Hugging Face id with this in place of the "/".
ID_SEPARATOR_IN_FILENAME = "__"
# How many hex digits of the SHA-256 name a model in the store: 48 bits, ample for config counts.
MODEL_KEY_HEX_DIGITS = 12
# How many close bundled names an "unknown model" error suggests, and how close they must be.
SUGGESTION_COUNT = 3
SUGGESTION_CUTOFF = 0.5
# Keys that describe a file, not the model: left out of the model key so re-saving a config
# (which stamps a new transformers_version or adds `_name_or_path`) keeps its inventories.
NON_FACT_KEYS = frozenset({"transformers_version"})
NON_FACT_PREFIX = "_"

# Fields that size a tensor: each must be a positive integer wherever a config carries it.
POSITIVE_INT_FIELDS = (
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "num_hidden_layers",
    "vocab_size",
    "intermediate_size",
    "head_dim",
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "num_experts_per_tok",
)
# Fields a config may set to null, meaning "derive it" (head_dim from hidden/heads, kv = heads).
NULLABLE_FIELDS = frozenset({"head_dim", "num_key_value_heads"})
# The names model families give to "how many experts a MoE layer holds".
EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")


@dataclass(frozen=True)
class ModelSpec:
    """A model as Dooly knows it: an id, its config.json facts, and where they came from.

    `source` is "bundled" for the configs shipped with Dooly, else the config file's path.
    """

    model_id: str
    config: dict
    source: str


def bundled_model_ids() -> list[str]:
    """The Hugging Face ids whose config facts ship with Dooly, sorted case-insensitively."""
    return sorted(_bundled_files(), key=str.lower)


def resolve_model(spec: str) -> ModelSpec:
    """Find a model's config from what a user typed on the command line.

    Accepted, in this order: an existing path to a config.json (or to a directory holding one,
    such as a downloaded snapshot), then a bundled Hugging Face id, matched case-insensitively,
    with or without its organisation ("Llama-3.1-8B" finds "meta-llama/Llama-3.1-8B").
    """
    text = spec.strip()
    if not text:
        raise DoolyError(
            "no model given: name a bundled model (see `dooly models`) or a config.json"
        )
    path = Path(text).expanduser()
    if path.is_dir():
        config_path = path / CONFIG_FILENAME
        if not config_path.is_file():
            raise DoolyError(f"directory {path} holds no {CONFIG_FILENAME}")
        return _spec_from_file(config_path, model_id=path.resolve().name)
    if path.is_file():
        return _spec_from_file(path, model_id=_id_for_file(path))
    bundled_id = _match_bundled(text)
    if bundled_id is not None:
        config = _load_json(_bundled_files()[bundled_id])
        _require_identity(config, bundled_id)
        return ModelSpec(model_id=bundled_id, config=config, source=BUNDLED_SOURCE)
    if _looks_like_path(text):
        raise DoolyError(f"no such file or directory: {text}")
    raise DoolyError(_unknown_model_message(text))


def build_hf_config(spec: ModelSpec, **overrides: Any) -> PretrainedConfig:
    """Build transformers' own config object for a model, after checking its shape fields.

    The config class comes from transformers' AutoConfig (by `model_type`), so every default and
    derived value (head_dim, layer_types, rope parameters) is the one the engine's forward uses.
    `overrides` replace config fields, e.g. `num_hidden_layers=1` to trace one layer; when they
    shorten the model and the config lists per-layer `layer_types`, the list follows the first
    layers so a shortened model keeps the real attention kinds of the layers it keeps.
    """
    from huggingface_hub.errors import StrictDataclassError

    share_import_structure_scans()
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    facts = _facts(spec.config)
    facts.update(overrides)
    _fit_layer_types(facts, overridden=set(overrides))
    model_type = _model_type_for(facts, spec.model_id)
    if model_type not in CONFIG_MAPPING:
        raise DoolyError(
            f"{spec.model_id}: model_type {model_type!r} is unknown to transformers "
            f"{_transformers_version()}"
        )
    _check_causal_lm(facts, model_type, spec.model_id)
    _check_shape_fields(facts, spec.model_id)
    check_required_fields(facts, model_type, spec.model_id, supplied=overrides)
    facts.pop("model_type", None)
    try:
        config = AutoConfig.for_model(model_type, **facts)
    except (ValueError, TypeError, ZeroDivisionError, KeyError, StrictDataclassError) as exc:
        raise DoolyError(
            f"{spec.model_id}: transformers rejects the config: {_one_line(exc)}"
        ) from exc
    logger.debug("built %s for %s from %s", type(config).__name__, spec.model_id, spec.source)
    return config


def model_key(spec: ModelSpec) -> str:
    """A short, stable hash of a model's config facts, used to name its inventories in the store.

    Two specs with the same facts share a key whatever their id or file, and a key never changes
    when a config is merely re-saved (file metadata such as `_source` or `transformers_version`
    is left out).
    """
    canonical = json.dumps(
        _facts(spec.config, drop_metadata=True), sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:MODEL_KEY_HEX_DIGITS]


def config_digest(spec: ModelSpec) -> str:
    """A SHA-256 of every config fact `build_hf_config` hands transformers.

    `model_key` leaves out the file metadata a re-saved config changes (`transformers_version`),
    so that a model keeps its inventories in the store; transformers' config class still reads
    that field, so whatever must change when a traced forward could (a cache of traces) hashes
    this instead of, or beside, the model key.
    """
    canonical = json.dumps(_facts(spec.config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@lru_cache(maxsize=1)
def _bundled_files() -> dict[str, Path]:
    """Bundled id -> file; the id is the file name with the separator turned back into "/"."""
    folder = resources.files("dooly.models").joinpath("configs")
    files: dict[str, Path] = {}
    for entry in folder.iterdir():
        if entry.name.endswith(".json"):
            model_id = entry.name.removesuffix(".json").replace(ID_SEPARATOR_IN_FILENAME, "/")
            files[model_id] = Path(str(entry))
    return files


def _match_bundled(text: str) -> str | None:
    wanted = text.lower()
    for model_id in _bundled_files():
        if wanted in (model_id.lower(), _bare_name(model_id).lower()):
            return model_id
    return None


def _bare_name(model_id: str) -> str:
    return model_id.rsplit("/", 1)[-1]


def _looks_like_path(text: str) -> bool:
    return text.endswith(".json") or text.startswith(("/", ".", "~")) or "\\" in text


def _unknown_model_message(text: str) -> str:
    candidates = {model_id.lower(): model_id for model_id in _bundled_files()}
    candidates.update({_bare_name(model_id).lower(): model_id for model_id in _bundled_files()})
    close = difflib.get_close_matches(
        text.lower(), candidates, n=SUGGESTION_COUNT, cutoff=SUGGESTION_CUTOFF
    )
    suggestions = list(dict.fromkeys(candidates[name] for name in close))
    hint = (
        f"; did you mean {', '.join(suggestions)}?"
        if suggestions
        else "; see `dooly models` for the bundled ones"
    )
    return (
        f"unknown model {text!r}: not a bundled model, nor a config.json or a directory "
        f"holding one{hint}"
    )


def _id_for_file(path: Path) -> str:
    """A config file named config.json is named by its folder (a snapshot); others by their stem."""
    resolved = path.resolve()
    if resolved.name == CONFIG_FILENAME and resolved.parent.name:
        return resolved.parent.name
    return resolved.stem


def _spec_from_file(path: Path, model_id: str) -> ModelSpec:
    config = _load_json(path)
    _require_identity(config, str(path))
    return ModelSpec(model_id=model_id, config=config, source=str(path))


def _load_json(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DoolyError(f"cannot read {path}: {_one_line(exc)}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DoolyError(
            f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from exc
    if not isinstance(data, dict):
        raise DoolyError(
            f"{path} must hold a JSON object (a config.json), not a {type(data).__name__}"
        )
    return data


def _require_identity(config: dict, where: str) -> None:
    if not config.get("model_type") and not config.get("architectures"):
        raise DoolyError(
            f"{where} has neither `model_type` nor `architectures`: is it a model's config.json?"
        )


def _facts(config: dict, drop_metadata: bool = False) -> dict:
    """A deep copy of the config without Dooly's own keys (and, for hashing, file metadata).

    A copy, because transformers edits nested dicts it is given (it folds rope_theta into
    rope_scaling), which would otherwise change a spec, and its model key, behind its back.
    """
    return {
        key: copy.deepcopy(value)
        for key, value in config.items()
        if not key.startswith(NON_FACT_PREFIX) and not (drop_metadata and key in NON_FACT_KEYS)
    }


def _fit_layer_types(facts: dict, overridden: set[str]) -> None:
    layer_types = facts.get("layer_types")
    layers = facts.get("num_hidden_layers")
    if "layer_types" in overridden or not isinstance(layer_types, list) or not layer_types:
        return
    if isinstance(layers, int) and layers > 0 and len(layer_types) != layers:
        facts["layer_types"] = [layer_types[i % len(layer_types)] for i in range(layers)]


def _causal_lm_names() -> dict[str, str]:
    """model_type -> causal-LM class name, as transformers' AutoModelForCausalLM maps them."""
    import_transformers_lean()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _model_type_for(facts: dict, model_id: str) -> str:
    """The config's model_type, or the one transformers pairs with its causal-LM architecture."""
    model_type = facts.get("model_type")
    if model_type:
        return str(model_type)
    architectures = _architectures(facts, model_id)
    if not architectures:
        raise DoolyError(f"{model_id} has neither `model_type` nor `architectures`")
    by_class = {name: mtype for mtype, name in _causal_lm_names().items()}
    for architecture in architectures:
        if architecture in by_class:
            return by_class[architecture]
    raise DoolyError(_unknown_architecture_message(architectures[0], model_id))


def _architectures(facts: dict, model_id: str) -> list[str]:
    architectures = facts.get("architectures")
    if architectures is None:
        return []
    if isinstance(architectures, str):
        architectures = [architectures]
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise DoolyError(
            f"{model_id}: `architectures` must be a list of class names, got {architectures!r}"
        )
    return architectures


def _check_causal_lm(facts: dict, model_type: str, model_id: str) -> None:
    """Only decoder LMs that AutoModelForCausalLM builds can be traced as an engine runs them."""
    causal = _causal_lm_names()
    expected = causal.get(model_type)
    architectures = _architectures(facts, model_id)
    known = set(causal.values())
    for architecture in architectures:
        if architecture not in known:
            raise DoolyError(_unknown_architecture_message(architecture, model_id))
    if expected is None:
        raise DoolyError(
            f"{model_id}: model_type {model_type!r} has no causal-LM class in transformers "
            f"{_transformers_version()}; Dooly traces decoder LMs only"
        )
    if architectures and expected not in architectures:
        raise DoolyError(
            f"{model_id}: architectures {architectures} do not match model_type {model_type!r}, "
            f"which transformers builds as {expected}"
        )


def _unknown_architecture_message(architecture: str, model_id: str) -> str:
    close = difflib.get_close_matches(
        architecture, sorted(set(_causal_lm_names().values())), n=SUGGESTION_COUNT
    )
    hint = f"; close ones: {', '.join(close)}" if close else ""
    return (
        f"{model_id}: architecture {architecture!r} is not a causal LM known to transformers "
        f"{_transformers_version()}{hint}"
    )


def _check_shape_fields(facts: dict, model_id: str) -> None:
    for field in POSITIVE_INT_FIELDS:
        if field in facts and not (field in NULLABLE_FIELDS and facts[field] is None):
            value = facts[field]
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise DoolyError(f"{model_id}: {field} must be a positive integer, got {value!r}")
    hidden = facts.get("hidden_size")
    heads = facts.get("num_attention_heads")
    kv_heads = facts.get("num_key_value_heads")
    if (
        hidden is not None
        and heads is not None
        and facts.get("head_dim") is None
        and hidden % heads
    ):
        raise DoolyError(
            f"{model_id}: hidden_size {hidden} is not divisible by num_attention_heads {heads} "
            "(and no head_dim is given)"
        )
    if heads is not None and kv_heads is not None and heads % kv_heads:
        raise DoolyError(
            f"{model_id}: num_attention_heads {heads} is not divisible by "
            f"num_key_value_heads {kv_heads}"
        )
    per_token = facts.get("num_experts_per_tok")
    for field in EXPERT_COUNT_FIELDS:
        experts = facts.get(field)
        if per_token is not None and experts is not None and per_token > experts:
            raise DoolyError(
                f"{model_id}: num_experts_per_tok {per_token} exceeds {field} {experts}"
            )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _transformers_version() -> str:
    import transformers

    return transformers.__version__

"""The fleet file: which GPU types, attention backends, engines and models the profiling Jobs cover.

Users edit one YAML file (the bundled default is `dooly/fleet/default_fleet.yaml`); everything the
Jobs need is derived from it. It is validated whole before anything runs, and every error names the
file and line (from YAML node marks), because the file usually lives in a ConfigMap and a mistake
found at 2 a.m. by the CronJob is a wasted night of GPU time.

    spec = FleetSpec.load(None)                 # the bundled default
    spec = FleetSpec.load("fleet.yaml").select(gpus=["h100-80gb"], backends=["paged|sdpa"])

A model is a bundled id, or the id or model key of a model profiled into the fleet's store (the
config `dooly profile` keeps beside its inventories): the store is opened, read only, for a name
no bundled config answers to, and the pods' `dooly profile`/`bench` find the config there too.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from dooly.errors import DoolyError
from dooly.fleet import checks
from dooly.models.registry import bundled_model_ids, resolve_model

DEFAULT_FLEET_RESOURCE = "default_fleet.yaml"
DEMO_FLEET_RESOURCE = "demo_fleet.yaml"

# Attention backends each engine adapter accepts (`dooly profile --engine E --attention B`).
# transformers: the continuous-batching ones and Dooly's profile-only paged|flex_attention
# (dooly.engines.transformers_cb.all_backends, kept literal so the spec loads without torch);
# vllm: its attention backend registry names.
KNOWN_BACKENDS: dict[str, tuple[str, ...]] = {
    "transformers": ("paged|sdpa", "paged|eager", "paged|flex_attention"),
    "vllm": ("FLASH_ATTN", "FLASHINFER", "FLEX_ATTENTION", "TRITON_ATTN", "CPU_ATTN"),
}
# Keep GPU type names short: they become part of Job names, which are at most 63 characters.
GPU_TYPE_NAME_MAX = 20
MAX_PODS_PER_JOB = 1000
MAX_GPUS_PER_POD = 16
_S3_URI = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(/[^\s]*)?$")
_TIME_ZONE = re.compile(r"^[A-Za-z]+(/[A-Za-z0-9_+-]+)*$")

Path_ = tuple[Any, ...]


@dataclass(frozen=True)
class Resources:
    """CPU and memory a pod requests (memory is also its limit: a pod that outgrows it is a bug)."""

    cpu: str
    memory: str


@dataclass(frozen=True)
class GpuType:
    """One kind of GPU node: its feature-discovery product label and how its profiling Job is split."""

    name: str
    product: str | None  # value of the `nvidia.com/gpu.product` node label; None for CPU nodes
    gpus: int  # GPUs per pod; 0 for a CPU-only pool (the demo)
    parallelism: int  # pods running at once
    completions: int  # shards of the work list (pods in all)
    backends: tuple[str, ...]
    tolerations: tuple[dict, ...]
    resources: Resources


@dataclass(frozen=True)
class Engine:
    """A serving engine and the profiler image that has it installed."""

    name: str
    image: str


@dataclass(frozen=True)
class ProfileTarget:
    """One profiling Job: a GPU type, an engine and one attention backend."""

    gpu: GpuType
    engine: Engine
    backend: str


@dataclass(frozen=True)
class Exploration:
    """One `dooly explore` the merge Job runs after each fit, its answer written to the store's
    reports/gen-N/<name>/ (`args`: the command's arguments after `explore`, store and report
    flags left to the Job)."""

    name: str
    args: tuple[str, ...]


@dataclass(frozen=True)
class FleetSpec:
    """A validated fleet file. Build it with `FleetSpec.load`; narrow it with `select`."""

    source: str
    text: str
    namespace: str
    store: str
    s3_secret: str
    schedule: str
    time_zone: str
    profiler_image: str
    controller_image: str
    models: tuple[str, ...]
    engines: tuple[Engine, ...]
    gpu_types: tuple[GpuType, ...]
    tolerations: tuple[dict, ...]
    merge_resources: Resources
    controller_resources: Resources
    profile_deadline_s: int
    merge_deadline_s: int
    ttl_after_finished_s: int
    retries_per_index: int
    merge_retries: int
    dtype: str | None = None  # None: the profiler's default
    profile_flags: tuple[str, ...] = ()  # extra `dooly profile` flags from the `profile:` section
    explorations: tuple[Exploration, ...] = ()  # `dooly explore` runs after each fit (`explorations:`)

    @classmethod
    def load(cls, path: str | Path | None = None, *, store: str | None = None) -> FleetSpec:
        """Load and validate a fleet file; None means the bundled default. STORE (`--store`)
        replaces the file's store, before its models are looked up in it."""
        if path is None:
            return cls.bundled(DEFAULT_FLEET_RESOURCE, store=store)
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise DoolyError(f"cannot read fleet file {file}: {exc.strerror or exc}") from exc
        return cls.from_text(text, source=str(file), store=store)

    @classmethod
    def bundled(cls, resource: str, *, store: str | None = None) -> FleetSpec:
        """One of the fleet files shipped inside the package (the default, the demo)."""
        text = resources.files("dooly.fleet").joinpath(resource).read_text(encoding="utf-8")
        return cls.from_text(text, source=f"bundled {resource}", store=store)

    @classmethod
    def from_text(cls, text: str, *, source: str, store: str | None = None) -> FleetSpec:
        doc = _Document.parse(text, source)
        return _build(doc, text, store)

    @property
    def is_s3(self) -> bool:
        return self.store.startswith("s3://")

    def select(
        self,
        *,
        gpus: Sequence[str] = (),
        backends: Sequence[str] = (),
        engines: Sequence[str] = (),
        models: Sequence[str] = (),
    ) -> FleetSpec:
        """The same fleet narrowed to some GPU types, backends and engines, or with other models.

        Every name must be known: a typo must not silently select nothing.
        """
        gpu_by_name = {g.name: g for g in self.gpu_types}
        for name in gpus:
            if name not in gpu_by_name:
                raise DoolyError(f"unknown GPU type {name!r}; {self.source} has: {', '.join(gpu_by_name)}")
        engine_by_name = {e.name: e for e in self.engines}
        for name in engines:
            if name not in engine_by_name:
                raise DoolyError(f"unknown engine {name!r}; {self.source} has: {', '.join(engine_by_name)}")
        chosen_gpus = [gpu_by_name[n] for n in dict.fromkeys(gpus)] or list(self.gpu_types)
        chosen_engines = [engine_by_name[n] for n in dict.fromkeys(engines)] or list(self.engines)
        offered = {b for g in chosen_gpus for b in g.backends}
        for backend in backends:
            if backend not in offered:
                raise DoolyError(
                    f"unknown backend {backend!r} for the selected GPU types; they offer: {', '.join(sorted(offered))}"
                )
        if backends:
            chosen_gpus = [
                dataclasses.replace(g, backends=tuple(b for b in g.backends if b in backends))
                for g in chosen_gpus
                if any(b in backends for b in g.backends)
            ]
        for model in models:
            model_config(model, self.store, DoolyError)
        spec = dataclasses.replace(
            self,
            gpu_types=tuple(chosen_gpus),
            engines=tuple(chosen_engines),
            models=tuple(dict.fromkeys(models)) or self.models,
        )
        if not spec.targets():
            raise DoolyError("this selection leaves no (GPU type, engine, backend) combination to profile")
        return spec

    def with_store(self, store: str | None) -> FleetSpec:
        """The same fleet writing to another store (a local directory for the local executor); its
        models must be known there too (a bundled id, or a config that store keeps)."""
        if store is None:
            return self
        _check_store(store, lambda message: DoolyError(f"--store: {message}"))
        for model in self.models:
            model_config(model, store, DoolyError)
        return dataclasses.replace(self, store=store)

    def targets(self) -> list[ProfileTarget]:
        """One profiling Job per (GPU type, engine, backend the engine supports)."""
        return [
            ProfileTarget(gpu, engine, backend)
            for gpu in self.gpu_types
            for engine in self.engines
            for backend in gpu.backends
            if backend in KNOWN_BACKENDS[engine.name]
        ]


def resolve_image(registry: str, reference: str) -> str:
    """`profiler:0.1.0` under registry `ghcr.io/x/dooly` -> `ghcr.io/x/dooly/profiler:0.1.0`."""
    if "/" in reference:
        return reference
    return f"{registry.rstrip('/')}/{reference}"


class _Document:
    """A parsed YAML document with the line of every node, so errors can point into the file."""

    def __init__(self, data: Any, lines: dict[Path_, int], source: str) -> None:
        self.data = data
        self.lines = lines
        self.source = source

    @classmethod
    def parse(cls, text: str, source: str) -> _Document:
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = f", line {mark.line + 1}" if mark else ""
            raise DoolyError(f"{source}{line}: not valid YAML: {exc.problem or exc.context}") from exc
        except yaml.YAMLError as exc:
            raise DoolyError(f"{source}: not valid YAML: {exc}") from exc
        if root is None:
            raise DoolyError(f"{source}: the fleet file is empty")
        lines: dict[Path_, int] = {}
        constructor = yaml.SafeLoader("")
        data = cls._walk(root, (), lines, constructor, source)
        return cls(data, lines, source)

    @classmethod
    def _walk(cls, node: yaml.Node, path: Path_, lines: dict, constructor: yaml.SafeLoader, source: str) -> Any:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            result: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    raise DoolyError(f"{source}, line {key_node.start_mark.line + 1}: keys must be plain words")
                key = key_node.value
                if key in result:
                    raise DoolyError(f"{source}, line {key_node.start_mark.line + 1}: duplicate key {key!r}")
                lines[path + (key,)] = key_node.start_mark.line + 1
                result[key] = cls._walk(value_node, path + (key,), lines, constructor, source)
            return result
        if isinstance(node, yaml.SequenceNode):
            return [cls._walk(item, path + (i,), lines, constructor, source) for i, item in enumerate(node.value)]
        try:
            return constructor.construct_object(node)
        except yaml.YAMLError as exc:
            raise DoolyError(f"{source}, line {node.start_mark.line + 1}: {exc}") from exc

    def error(self, path: Path_, message: str) -> DoolyError:
        probe = path
        while probe not in self.lines and probe:
            probe = probe[:-1]
        where = _dotted(path)
        prefix = f"{self.source}, line {self.lines.get(probe, 1)}"
        return DoolyError(f"{prefix}: {where}: {message}" if where else f"{prefix}: {message}")

    def mapping(self, value: Any, path: Path_, *, required: Iterable[str], optional: Iterable[str]) -> dict:
        if not isinstance(value, dict):
            raise self.error(path, f"expected a mapping, got {_kind(value)}")
        required, optional = tuple(required), tuple(optional)
        for key in value:
            if key not in required and key not in optional:
                allowed = ", ".join(required + optional)
                raise self.error(path + (key,), f"unknown field (allowed here: {allowed})")
        for key in required:
            if key not in value:
                raise self.error(path, f"missing required field {key!r}")
        return value

    def string(self, value: Any, path: Path_) -> str:
        if not isinstance(value, str) or not value:
            raise self.error(path, f"expected a non-empty string, got {_kind(value)}")
        return value

    def integer(self, value: Any, path: Path_, *, minimum: int, maximum: int | None = None) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.error(path, f"expected an integer, got {_kind(value)}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"{minimum}..{maximum}" if maximum is not None else f">= {minimum}"
            raise self.error(path, f"{value} is out of range ({bound})")
        return value

    def string_list(self, value: Any, path: Path_) -> tuple[str, ...]:
        if not isinstance(value, list) or not value:
            raise self.error(path, f"expected a non-empty list, got {_kind(value)}")
        items = tuple(self.string(item, path + (i,)) for i, item in enumerate(value))
        for i, item in enumerate(items):
            if item in items[:i]:
                raise self.error(path + (i,), f"{item!r} is listed twice")
        return items


def _dotted(path: Path_) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a list"
    return f"{type(value).__name__} {value!r}"


_TOP_REQUIRED = ("namespace", "store", "s3Secret", "images", "models", "engines", "gpuTypes")
_TOP_OPTIONAL = ("schedule", "timeZone", "tolerations", "resources", "deadlines", "retries", "profile", "explorations")
# `explorations:` entries: required and optional fields, and the workload fields with their flags.
EXPLORATION_REQUIRED = ("name", "models", "slo")
EXPLORATION_OPTIONAL = ("platforms", "backends", "engines", "dtypes", "tp", "settings", "workload")
EXPLORATION_LIST_FLAGS = {"platforms": "--platform", "backends": "--backend", "engines": "--engine", "dtypes": "--dtype"}
EXPLORATION_WORKLOAD_INT = {"requests": "--requests", "seed": "--seed"}
EXPLORATION_WORKLOAD_STR = {"promptLen": "--prompt-len", "outputLen": "--output-len", "arrival": "--arrival"}
EXPLORATION_WORKLOAD_NUM = {"cv": "--cv"}
# A container is named explore-<name>: at most 63 characters.
EXPLORATION_NAME_MAX = 40
# Optional `profile:` settings and the `dooly profile` flags they become (the sweep of request dims).
PROFILE_INT_FLAGS = {
    "maxTokens": "--max-tokens",
    "maxSeqs": "--max-seqs",
    "maxKv": "--max-kv",
    "maxContext": "--max-context",
    "samples": "--samples",
}
PROFILE_DTYPES = ("bfloat16", "float16", "float32")
# `profile.attentionGrid`: the attention batch design (`dooly profile --attention-grid`).
PROFILE_ATTENTION_GRID = "attentionGrid"
# `profile.tokenBudgets`: the engines' token budgets the fleet serves at (`dooly profile --token-budget`).
PROFILE_TOKEN_BUDGETS = "tokenBudgets"
# `profile.contexts`: context lengths the fleet's requests reach (`dooly profile --context`).
PROFILE_CONTEXTS = "contexts"
# The list-valued profile keys: each item passed as one flag, with what an item is called in errors.
PROFILE_LIST_FLAGS = {
    PROFILE_TOKEN_BUDGETS: ("--token-budget", "token budgets"),
    PROFILE_CONTEXTS: ("--context", "context lengths"),
}
_DEFAULT_SCHEDULE = "0 2 * * *"
_DEFAULT_TIME_ZONE = "Etc/UTC"
_DEFAULT_RESOURCES = {
    "profiler": Resources(cpu="8", memory="64Gi"),
    "merge": Resources(cpu="2", memory="8Gi"),
    "controller": Resources(cpu="100m", memory="256Mi"),
}
_DEFAULT_DEADLINES = {"profileSeconds": 6 * 3600, "mergeSeconds": 2 * 3600, "ttlSecondsAfterFinished": 2 * 86400}
_DEFAULT_RETRIES = {"perIndex": 2, "merge": 2}
_DEADLINE_MIN_S = 60
_RETRIES_MAX = 10


def _build(doc: _Document, text: str, store_override: str | None = None) -> FleetSpec:
    top = doc.mapping(doc.data, (), required=_TOP_REQUIRED, optional=_TOP_OPTIONAL)
    namespace = doc.string(top["namespace"], ("namespace",))
    if not checks.is_dns1123_label(namespace):
        raise doc.error(("namespace",), f"{namespace!r} is not a DNS-1123 label")
    store = doc.string(top["store"], ("store",))
    _check_store(store, lambda message: doc.error(("store",), message))
    if store_override is not None:
        _check_store(store_override, lambda message: DoolyError(f"--store: {message}"))
        store = store_override
    secret = doc.string(top["s3Secret"], ("s3Secret",))
    if not checks.is_dns1123_subdomain(secret):
        raise doc.error(("s3Secret",), f"{secret!r} is not a valid Secret name")
    schedule = doc.string(top.get("schedule", _DEFAULT_SCHEDULE), ("schedule",))
    if len(schedule.split()) != checks.CRON_FIELDS:
        raise doc.error(("schedule",), f"{schedule!r} is not a {checks.CRON_FIELDS}-field cron expression")
    time_zone = doc.string(top.get("timeZone", _DEFAULT_TIME_ZONE), ("timeZone",))
    if not _TIME_ZONE.match(time_zone):
        raise doc.error(("timeZone",), f"{time_zone!r} is not an IANA time zone name")

    images = doc.mapping(top["images"], ("images",), required=("registry", "profiler", "controller"), optional=())
    registry = doc.string(images["registry"], ("images", "registry"))
    profiler_image = _image(doc, registry, images["profiler"], ("images", "profiler"))
    controller_image = _image(doc, registry, images["controller"], ("images", "controller"))

    models = doc.string_list(top["models"], ("models",))
    configs = {model: model_config(model, store, _at_path(doc, ("models", i))) for i, model in enumerate(models)}

    engines = _engines(doc, top["engines"], registry, profiler_image)
    resources_by_role = _resources(doc, top.get("resources", {}))
    tolerations = _tolerations(doc, top.get("tolerations", _default_tolerations()), ("tolerations",))
    gpu_types = _gpu_types(doc, top["gpuTypes"], engines, resources_by_role["profiler"])
    _check_tensor_parallel(doc, gpu_types, configs, engines)

    deadlines = doc.mapping(top.get("deadlines", {}), ("deadlines",), required=(), optional=_DEFAULT_DEADLINES)
    seconds = {
        key: doc.integer(deadlines.get(key, default), ("deadlines", key), minimum=_DEADLINE_MIN_S)
        for key, default in _DEFAULT_DEADLINES.items()
    }
    retries_map = doc.mapping(top.get("retries", {}), ("retries",), required=(), optional=_DEFAULT_RETRIES)
    retries = {
        key: doc.integer(retries_map.get(key, default), ("retries", key), minimum=0, maximum=_RETRIES_MAX)
        for key, default in _DEFAULT_RETRIES.items()
    }
    dtype, profile_flags = _profile_section(doc, top.get("profile", {}))
    explorations = _explorations(doc, top.get("explorations", []))
    return FleetSpec(
        source=doc.source,
        text=text,
        namespace=namespace,
        store=store,
        s3_secret=secret,
        schedule=schedule,
        time_zone=time_zone,
        profiler_image=profiler_image,
        controller_image=controller_image,
        models=models,
        engines=engines,
        gpu_types=gpu_types,
        tolerations=tolerations,
        merge_resources=resources_by_role["merge"],
        controller_resources=resources_by_role["controller"],
        profile_deadline_s=seconds["profileSeconds"],
        merge_deadline_s=seconds["mergeSeconds"],
        ttl_after_finished_s=seconds["ttlSecondsAfterFinished"],
        retries_per_index=retries["perIndex"],
        merge_retries=retries["merge"],
        dtype=dtype,
        profile_flags=profile_flags,
        explorations=explorations,
    )


def _explorations(doc: _Document, value: Any) -> tuple[Exploration, ...]:
    """The `explorations:` list: each entry becomes the arguments of one `dooly explore`."""
    from dooly.explore.search import SLO_METRICS, SLO_STATISTICS

    if not isinstance(value, list):
        raise doc.error(("explorations",), f"expected a list, got {_kind(value)}")
    found: list[Exploration] = []
    for i, entry in enumerate(value):
        path: Path_ = ("explorations", i)
        section = doc.mapping(entry, path, required=EXPLORATION_REQUIRED, optional=EXPLORATION_OPTIONAL)
        name = doc.string(section["name"], path + ("name",))
        if not checks.is_dns1123_label(name) or len(name) > EXPLORATION_NAME_MAX:
            raise doc.error(path + ("name",), f"{name!r} is not a DNS-1123 label of at most {EXPLORATION_NAME_MAX} characters")
        if any(e.name == name for e in found):
            raise doc.error(path + ("name",), f"exploration {name!r} is listed twice")
        args = list(doc.string_list(section["models"], path + ("models",)))
        slo = doc.mapping(section["slo"], path + ("slo",), required=(),
                          optional=tuple(f"{m}_{s}" for m in SLO_METRICS for s in SLO_STATISTICS))
        if not slo:
            raise doc.error(path + ("slo",), "give at least one objective, e.g. ttft_p90: 0.5")
        for metric, limit in slo.items():
            if isinstance(limit, bool) or not isinstance(limit, int | float) or not limit > 0:
                raise doc.error(path + ("slo", metric), f"expected a positive number of seconds, got {_kind(limit)}")
            args += ["--slo", f"{metric}={limit}"]
        for key, flag in EXPLORATION_LIST_FLAGS.items():
            if key in section:
                for item in doc.string_list(section[key], path + (key,)):
                    args += [flag, item]
        if "tp" in section:
            if not isinstance(section["tp"], list) or not section["tp"]:
                raise doc.error(path + ("tp",), f"expected a non-empty list of degrees, got {_kind(section['tp'])}")
            degrees = [doc.integer(d, path + ("tp", j), minimum=1, maximum=MAX_GPUS_PER_POD) for j, d in enumerate(section["tp"])]
            args += ["--tp", ",".join(str(d) for d in degrees)]
        settings = doc.mapping(section.get("settings", {}), path + ("settings",), required=(),
                               optional=tuple(section.get("settings", {}) or ()))
        for key, values in settings.items():
            items = values if isinstance(values, list) else [values]
            if not items or any(isinstance(v, dict | list) or v is None for v in items):
                raise doc.error(path + ("settings", key), "expected a scalar or a list of scalars")
            args += ["--set", f"{key}={','.join(json.dumps(v) if not isinstance(v, str) else v for v in items)}"]
        workload = doc.mapping(section.get("workload", {}), path + ("workload",), required=(),
                               optional=(*EXPLORATION_WORKLOAD_INT, *EXPLORATION_WORKLOAD_STR, *EXPLORATION_WORKLOAD_NUM))
        for key, value in workload.items():
            where = path + ("workload", key)
            if key in EXPLORATION_WORKLOAD_INT:
                args += [EXPLORATION_WORKLOAD_INT[key], str(doc.integer(value, where, minimum=1 if key == "requests" else 0))]
            elif key in EXPLORATION_WORKLOAD_STR:
                args += [EXPLORATION_WORKLOAD_STR[key], doc.string(value, where)]
            else:
                if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                    raise doc.error(where, f"expected a positive number, got {_kind(value)}")
                args += [EXPLORATION_WORKLOAD_NUM[key], str(value)]
        found.append(Exploration(name=name, args=tuple(args)))
    return tuple(found)


def _profile_section(doc: _Document, value: Any) -> tuple[str | None, tuple[str, ...]]:
    from dooly.profile.grid import ATTENTION_DESIGNS

    section = doc.mapping(value, ("profile",), required=(), optional=("dtype", PROFILE_ATTENTION_GRID, *PROFILE_LIST_FLAGS,
                                                                                *PROFILE_INT_FLAGS))
    dtype = None
    if "dtype" in section:
        dtype = doc.string(section["dtype"], ("profile", "dtype"))
        if dtype not in PROFILE_DTYPES:
            raise doc.error(("profile", "dtype"), f"{dtype!r} is not one of {', '.join(PROFILE_DTYPES)}")
    flags: list[str] = []
    if PROFILE_ATTENTION_GRID in section:
        design = doc.string(section[PROFILE_ATTENTION_GRID], ("profile", PROFILE_ATTENTION_GRID))
        if design not in ATTENTION_DESIGNS:
            raise doc.error(("profile", PROFILE_ATTENTION_GRID),
                            f"{design!r} is not one of {', '.join(sorted(ATTENTION_DESIGNS))}")
        flags += ["--attention-grid", design]
    for key, flag in PROFILE_INT_FLAGS.items():
        if key in section:
            flags += [flag, str(doc.integer(section[key], ("profile", key), minimum=1))]
    for key, (flag, items) in PROFILE_LIST_FLAGS.items():
        if key not in section:
            continue
        values = section[key]
        path = ("profile", key)
        if not isinstance(values, list) or not values:
            raise doc.error(path, f"expected a non-empty list of {items}, got {_kind(values)}")
        for i, item in enumerate(values):
            if item in values[:i]:
                raise doc.error(path + (i,), f"{item!r} is listed twice")
            flags += [flag, str(doc.integer(item, path + (i,), minimum=1))]
    return dtype, tuple(flags)


def _at_path(doc: _Document, path: Path_) -> Callable[[str], Exception]:
    """An error factory for messages about the node at PATH."""
    return lambda message: doc.error(path, message)


def model_config(model: str, store: str, error: Callable[[str], Exception]) -> dict[str, Any]:
    """The config a fleet's MODEL names: a bundled id's, else the config STORE keeps under that id
    or model key (`find_stored_model`, as `resolve_model_with_store` reads it; the store is opened,
    read only, only for such a name). A config file is no fleet model: the pods do not have it. A
    name neither knows raises `error(message)`, one line."""
    from dooly.models.stored import find_stored_model
    from dooly.store.backends import open_store

    known = bundled_model_ids()
    if model in known:
        return resolve_model(model).config
    unknown = f"unknown model {model!r}: pods take a bundled model ({', '.join(known)}) or one profiled into the store"
    try:
        spec = find_stored_model(open_store(store, create=False), model)
    except DoolyError as exc:
        raise error(f"{unknown}; {exc}") from None
    if spec is None:
        raise error(f"{unknown}, and {store} keeps no config under that id or model key "
                    f"(`dooly profile CONFIG --store {store}` stores one)")
    return spec.config


def _check_store(store: str, error) -> None:
    if store.startswith("s3://"):
        if not _S3_URI.match(store):
            raise error(f"{store!r} is not s3://BUCKET[/PREFIX] with a valid bucket name")
    elif "://" in store:
        raise error(f"{store!r}: only s3:// URIs and local directories are stores")


def _image(doc: _Document, registry: str, value: Any, path: Path_) -> str:
    image = resolve_image(registry, doc.string(value, path))
    problem = checks.image_problem(image)
    if problem:
        raise doc.error(path, problem)
    return image


def _engines(doc: _Document, value: Any, registry: str, profiler_image: str) -> tuple[Engine, ...]:
    if not isinstance(value, list) or not value:
        raise doc.error(("engines",), f"expected a non-empty list of engines, got {_kind(value)}")
    engines: list[Engine] = []
    for i, item in enumerate(value):
        path = ("engines", i)
        entry = doc.mapping(item, path, required=("name",), optional=("image",))
        name = doc.string(entry["name"], path + ("name",))
        if name not in KNOWN_BACKENDS:
            raise doc.error(path + ("name",), f"unknown engine {name!r} (known: {', '.join(KNOWN_BACKENDS)})")
        if any(e.name == name for e in engines):
            raise doc.error(path + ("name",), f"engine {name!r} is listed twice")
        image = _image(doc, registry, entry["image"], path + ("image",)) if "image" in entry else profiler_image
        engines.append(Engine(name=name, image=image))
    return tuple(engines)


def _resources(doc: _Document, value: Any) -> dict[str, Resources]:
    section = doc.mapping(value, ("resources",), required=(), optional=_DEFAULT_RESOURCES)
    return {
        role: _resource_pair(doc, section[role], ("resources", role)) if role in section else default
        for role, default in _DEFAULT_RESOURCES.items()
    }


def _resource_pair(doc: _Document, value: Any, path: Path_) -> Resources:
    entry = doc.mapping(value, path, required=("cpu", "memory"), optional=())
    pair = {}
    for key in ("cpu", "memory"):
        quantity = entry[key]
        text = str(quantity) if isinstance(quantity, int) and not isinstance(quantity, bool) else quantity
        if not checks.is_quantity(text):
            raise doc.error(path + (key,), f"{quantity!r} is not a Kubernetes quantity (e.g. 8, 500m, 64Gi)")
        pair[key] = text
    return Resources(**pair)


def _default_tolerations() -> list[dict]:
    return [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def _tolerations(doc: _Document, value: Any, path: Path_) -> tuple[dict, ...]:
    if not isinstance(value, list):
        raise doc.error(path, f"expected a list of tolerations, got {_kind(value)}")
    result = []
    for i, item in enumerate(value):
        entry = doc.mapping(
            item, path + (i,), required=(), optional=("key", "operator", "value", "effect", "tolerationSeconds")
        )
        operator = entry.get("operator", "Equal")
        if operator not in checks.TOLERATION_OPERATORS:
            raise doc.error(path + (i, "operator"), f"{operator!r} is not Exists or Equal")
        effect = entry.get("effect", "")
        if effect not in checks.TOLERATION_EFFECTS:
            raise doc.error(path + (i, "effect"), f"{effect!r} is not NoSchedule, PreferNoSchedule or NoExecute")
        if "key" in entry and not checks.is_label_key(entry["key"]):
            raise doc.error(path + (i, "key"), f"{entry['key']!r} is not a valid taint key")
        if operator == "Exists" and "value" in entry:
            raise doc.error(path + (i, "value"), "operator Exists takes no value")
        if "value" in entry and not checks.is_label_value(entry["value"]):
            raise doc.error(path + (i, "value"), f"{entry['value']!r} is not a valid taint value")
        if "tolerationSeconds" in entry:
            doc.integer(entry["tolerationSeconds"], path + (i, "tolerationSeconds"), minimum=0)
        result.append(dict(entry))
    return tuple(result)


# Config fields a tensor-parallel degree must divide (as the tracer's own check); KV heads only when > 1,
# since one KV head is replicated on every rank.
TP_DIVIDED_FIELDS = ("num_attention_heads", "intermediate_size", "vocab_size")
TP_DIVIDED_KV_FIELD = "num_key_value_heads"
# The engines whose adapter traces tensor-parallel ranks (and their collectives).
TP_ENGINES = frozenset({"transformers"})


def _check_tensor_parallel(
    doc: _Document, gpu_types: tuple[GpuType, ...], configs: dict[str, dict[str, Any]], engines: tuple[Engine, ...]
) -> None:
    """A pod with `gpus: N > 1` profiles every model at --tp N (one rank's ops and the collectives
    among the N GPUs); refuse, in one line saying why, a GPU type where that cannot hold: an engine
    whose adapter traces tp=1 only, or a model whose heads or widths N does not divide."""
    for i, gpu in enumerate(gpu_types):
        if gpu.gpus <= 1:
            continue
        path = ("gpuTypes", i, "gpus")
        for engine in engines:
            uses = [b for b in gpu.backends if b in KNOWN_BACKENDS[engine.name]]
            if uses and engine.name not in TP_ENGINES:
                raise doc.error(
                    path,
                    f"gpus: {gpu.gpus} means profiling at --tp {gpu.gpus}, but the {engine.name} engine "
                    f"(backend {uses[0]}) traces tp=1 only; give {engine.name} backends a GPU type with gpus: 1",
                )
        for model, config in configs.items():
            text = config.get("text_config", config) if isinstance(config.get("text_config"), dict) else config
            for name in TP_DIVIDED_FIELDS:
                value = text.get(name)
                if isinstance(value, int) and value % gpu.gpus:
                    raise doc.error(
                        path, f"gpus: {gpu.gpus} means profiling at --tp {gpu.gpus}, which does not divide "
                        f"{model}'s {name}={value}",
                    )
            kv_heads = text.get(TP_DIVIDED_KV_FIELD)
            if isinstance(kv_heads, int) and kv_heads > 1 and kv_heads % gpu.gpus:
                raise doc.error(
                    path, f"gpus: {gpu.gpus} means profiling at --tp {gpu.gpus}, which does not divide "
                    f"{model}'s {TP_DIVIDED_KV_FIELD}={kv_heads}",
                )


def _gpu_types(
    doc: _Document, value: Any, engines: tuple[Engine, ...], default_resources: Resources
) -> tuple[GpuType, ...]:
    if not isinstance(value, list) or not value:
        raise doc.error(("gpuTypes",), f"expected a non-empty list of GPU types, got {_kind(value)}")
    supported = {b: e.name for e in engines for b in KNOWN_BACKENDS[e.name]}
    gpu_types: list[GpuType] = []
    for i, item in enumerate(value):
        path = ("gpuTypes", i)
        entry = doc.mapping(
            item,
            path,
            required=("name", "gpus", "completions", "backends"),
            optional=("product", "parallelism", "tolerations", "resources"),
        )
        name = doc.string(entry["name"], path + ("name",))
        if not checks.is_dns1123_label(name) or len(name) > GPU_TYPE_NAME_MAX:
            raise doc.error(
                path + ("name",), f"{name!r} must be a DNS-1123 label of at most {GPU_TYPE_NAME_MAX} characters"
            )
        if any(g.name == name for g in gpu_types):
            raise doc.error(path + ("name",), f"GPU type {name!r} is listed twice")
        gpus = doc.integer(entry["gpus"], path + ("gpus",), minimum=0, maximum=MAX_GPUS_PER_POD)
        product = entry.get("product")
        if gpus > 0:
            if product is None:
                raise doc.error(path, "a GPU type with gpus > 0 needs its `product` label value")
            product = doc.string(product, path + ("product",))
            if not checks.is_label_value(product):
                raise doc.error(path + ("product",), f"{product!r} is not a valid node label value")
        elif product is not None:
            raise doc.error(path + ("product",), "a CPU pool (gpus: 0) has no GPU product label")
        completions = doc.integer(entry["completions"], path + ("completions",), minimum=1, maximum=MAX_PODS_PER_JOB)
        parallelism = doc.integer(
            entry.get("parallelism", completions), path + ("parallelism",), minimum=1, maximum=completions
        )
        backends = doc.string_list(entry["backends"], path + ("backends",))
        for j, backend in enumerate(backends):
            if backend not in supported:
                raise doc.error(
                    path + ("backends", j),
                    f"unknown backend {backend!r} for engines {', '.join(e.name for e in engines)} "
                    f"(known: {', '.join(sorted(supported))})",
                )
        gpu_types.append(
            GpuType(
                name=name,
                product=product,
                gpus=gpus,
                parallelism=parallelism,
                completions=completions,
                backends=backends,
                tolerations=_tolerations(doc, entry.get("tolerations", []), path + ("tolerations",)),
                resources=(
                    _resource_pair(doc, entry["resources"], path + ("resources",))
                    if "resources" in entry
                    else default_resources
                ),
            )
        )
    return tuple(gpu_types)

"""Fitted models in the store: writing a generation beside the snapshot, finding and loading it.

Store layout, next to the snapshot:
    models/gen-<NNNNNN>/<group>.json   one GroupModel per platform/engine/backend/dtype, as data
                                       (codec.py: schema dooly.fitted-group, format 4)
    models/gen-<NNNNNN>/meta.json      schema, format, writer's versions, generation, per-class
                                       errors (written last: readers look for it)

Loading reads JSON only: nothing in the store is unpickled or imported, and the writer's library
versions (recorded for provenance) are not checked, so any reader of this format reads any
writer's models. A generation of an older format (joblib pickles, format <= 3) is refused with
one line that names `dooly fit`, before any model file of it is opened.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from dooly import SCHEMA_VERSION
from dooly.errors import DoolyError
from dooly.fit.codec import FORMAT_VERSION, CodecError, decode_group, encode_group
from dooly.fit.group import GroupModel, with_shared_ops
from dooly.fit.training import GROUP_COLUMNS
from dooly.profile.provenance import COMM_ENGINES, SHARED_BACKEND

if TYPE_CHECKING:
    from dooly.fit.predictor import Predictor
    from dooly.fit.report import FitReport
    from dooly.store.backends import Store

MODELS_PREFIX = "models/"
INVENTORY_PREFIX = "inventories/"
META_NAME = "meta.json"
META_SCHEMA = "dooly.fitted-models"
MODEL_SUFFIX = ".json"
GENERATION_DIGITS = 6
GENERATION_RE = re.compile(r"^models/gen-(\d+)/meta\.json$")
SLUG_HASH_CHARS = 8
# The newest format whose model files were pickles: named in the refusal of such a store.
LAST_PICKLE_FORMAT = 3

__all__ = [
    "FORMAT_VERSION",
    "SHARED_BACKEND",
    "check_feature_widths",
    "collective_groups",
    "fit_store",
    "group_slug",
    "latest_meta_key",
    "load_group",
    "load_predictor",
    "read_inventories",
    "serialize_group",
    "store_predictor",
]


def _generation_prefix(generation: int) -> str:
    return f"{MODELS_PREFIX}gen-{generation:0{GENERATION_DIGITS}d}/"


def group_slug(key: tuple[str, ...]) -> str:
    """A readable, collision-free object name for a group (backends hold "|", platforms spaces)."""
    readable = "__".join(re.sub(r"[^A-Za-z0-9._-]+", "-", part) for part in key)
    digest = hashlib.sha256("\x00".join(key).encode()).hexdigest()[:SLUG_HASH_CHARS]
    return f"{readable}-{digest}"


def serialize_group(model: GroupModel) -> bytes:
    """A group's model file: its codec document as compact JSON (floats exact, no NaN literals)."""
    return json.dumps(encode_group(model), separators=(",", ":"), allow_nan=False).encode()


def read_inventories(store: Store) -> dict[str, dict[str, Any]]:
    """Every inventory document of the store (inventories/<model_key>[/<backend>].json), by key.
    The model configs kept beside them (inventories/<model_key>/config.json) are no inventories:
    they are left unread here, for `dooly.models.stored` to read where a command needs a config."""
    from dooly.store.documents import read_json
    from dooly.store.keys import MODEL_CONFIG_NAME

    found: dict[str, dict[str, Any]] = {}
    for key in store.list_keys(INVENTORY_PREFIX):
        folder, _, name = key[len(INVENTORY_PREFIX):].rpartition("/")
        if not key.endswith(".json") or (folder and name == MODEL_CONFIG_NAME):
            continue
        payload = read_json(store, key)
        if isinstance(payload, dict) and isinstance(payload.get("operations"), list):
            found[key[len(INVENTORY_PREFIX) : -len(".json")]] = payload
    return found


def fit_store(
    store: Store, *, folds: int | None = None, repeats: int | None = None, jobs: int | None = None
) -> FitReport:
    """Fit the store's current snapshot and persist the models under models/gen-<generation>/,
    on `jobs` processes (default: the CPUs available, see parallel.default_jobs).

    All model files are serialised before anything is written, and meta.json (what readers look
    for) is written last; a failure while writing removes what this call wrote.
    """
    from dooly.fit.parallel import default_jobs
    from dooly.fit.selection import DEFAULT_FOLDS, DEFAULT_REPEATS, fit_frame
    from dooly.store.documents import write_json
    from dooly.store.merge import read_snapshot

    folds = DEFAULT_FOLDS if folds is None else folds
    repeats = DEFAULT_REPEATS if repeats is None else repeats
    frame, manifest = read_snapshot(store)
    manifest_version = manifest.get("schema_version", SCHEMA_VERSION)
    if manifest_version != SCHEMA_VERSION:
        raise DoolyError(
            f"store {store.uri}: snapshot of schema version {manifest_version}; this Dooly reads "
            f"version {SCHEMA_VERSION}"
        )
    generation = int(manifest["generation"])
    inventories = read_inventories(store)
    models, report = fit_frame(
        frame,
        generation=generation,
        inventories=inventories,
        folds=folds,
        repeats=repeats,
        jobs=default_jobs() if jobs is None else jobs,
    )
    prefix = _generation_prefix(generation)
    blobs = {f"{prefix}{group_slug(key)}{MODEL_SUFFIX}": serialize_group(m) for key, m in models.items()}
    meta_key = f"{prefix}{META_NAME}"
    meta = {
        "schema": META_SCHEMA,
        "format": FORMAT_VERSION,
        "schema_version": SCHEMA_VERSION,
        "generation": generation,
        "created_at": datetime.now(UTC).isoformat(),
        "versions": report.versions,
        "folds": folds,
        "repeats": repeats,
        "overall": report.overall,
        "inventories": sorted(inventories),
        "groups": [{**g, "key": key} for g, key in zip(report.groups, blobs, strict=True)],
        "leave_one_model_out": report.lomo,
    }
    written: list[str] = []
    try:
        if store.exists(meta_key):
            store.delete(meta_key)
        # A refit of the same generation replaces it whole: older model files (a pickle of format
        # <= 3 among them) must not linger beside the new ones.
        for key in store.list_keys(prefix):
            if key not in blobs:
                store.delete(key)
        for key, blob in blobs.items():
            store.put_bytes(key, blob)
            written.append(key)
        write_json(store, meta_key, meta)
    except BaseException:
        for key in written:
            store.delete(key)
        raise
    report.meta_key = meta_key
    return report


# ---------------------------------------------------------------------------------------------
# Loading


def latest_meta_key(store: Store) -> str:
    """The meta.json of the newest fitted generation (DoolyError when the store holds none)."""
    found = {}
    for key in store.list_keys(MODELS_PREFIX):
        match = GENERATION_RE.match(key)
        if match:
            found[key] = int(match.group(1))
    if not found:
        raise DoolyError(
            f"store {store.uri} holds no fitted models: run `dooly fit --store {store.uri}` first"
        )
    return max(found, key=found.__getitem__)


def read_meta(store: Store, meta_key: str) -> dict[str, Any]:
    """The generation's meta.json, refused in one line unless it is this format's."""
    where = f"models in {store.uri}/{meta_key}"
    try:
        meta = json.loads(store.get_bytes(meta_key))
    except FileNotFoundError as exc:
        raise DoolyError(f"{where}: meta.json vanished while reading: run `dooly fit` again") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise DoolyError(f"{where}: meta.json is not JSON: run `dooly fit --store {store.uri}` again") from exc
    if not isinstance(meta, dict):
        raise DoolyError(f"{where}: meta.json is not a JSON object: run `dooly fit --store {store.uri}` again")
    fmt = meta.get("format")
    if fmt != FORMAT_VERSION or meta.get("schema") != META_SCHEMA:
        pickled = isinstance(fmt, int) and fmt <= LAST_PICKLE_FORMAT
        what = "joblib pickles, never loaded: they could run code" if pickled else "unknown to this Dooly"
        raise DoolyError(
            f"{where}: model format {fmt} ({what}); this Dooly reads format {FORMAT_VERSION}: "
            f"run `dooly fit --store {store.uri}` again"
        )
    return meta


def _read_group(store: Store, key: str, meta_key: str) -> GroupModel:
    """One model file, decoded as data (JSON only: nothing in it is executed)."""
    if not key.startswith(MODELS_PREFIX) or not key.endswith(MODEL_SUFFIX):
        raise DoolyError(
            f"store {store.uri}: {meta_key} lists {key!r}, not a {MODEL_SUFFIX} model file: "
            f"run `dooly fit --store {store.uri}` again"
        )
    try:
        blob = store.get_bytes(key)
    except FileNotFoundError as exc:
        raise DoolyError(f"store {store.uri}: {key} listed in {meta_key} is missing") from exc
    try:
        document = json.loads(blob)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise DoolyError(
            f"store {store.uri}: {key} is not a JSON document (a fitted group of format {FORMAT_VERSION} "
            f"is): run `dooly fit --store {store.uri}` again"
        ) from exc
    try:
        return decode_group(document)
    except CodecError as exc:
        reason = " ".join(str(exc).split())
        raise DoolyError(
            f"store {store.uri}: {key} is not a fitted group of format {FORMAT_VERSION} ({reason}): "
            f"run `dooly fit --store {store.uri}` again"
        ) from exc


def load_group(
    store: Store, *, platform: str, engine: str, backend: str, dtype: str
) -> tuple[GroupModel, dict[str, Any]]:
    """The newest generation's model of one platform/engine/backend/dtype, and its meta.json."""
    meta_key = latest_meta_key(store)
    meta = read_meta(store, meta_key)
    wanted = {"platform": platform, "engine": engine, "backend": backend, "dtype": dtype}
    for entry in meta.get("groups", []):
        if all(entry.get(k) == v for k, v in wanted.items()):
            return _read_group(store, str(entry.get("key")), meta_key), meta
    fitted = sorted({"/".join(str(e.get(k)) for k in GROUP_COLUMNS) for e in meta.get("groups", [])})
    for name, value in wanted.items():
        known = sorted({str(e.get(name)) for e in meta.get("groups", [])})
        if value not in known:
            raise DoolyError(
                f"no fitted models for {name} {value!r} in {store.uri}; known: {', '.join(known)}"
            )
    raise DoolyError(
        f"no fitted models for {platform}/{engine}/{backend}/{dtype} in {store.uri}; "
        f"fitted: {', '.join(fitted)}"
    )


def load_predictor(
    store: Store, *, platform: str, engine: str, backend: str, dtype: str, interconnect: str | None = None
) -> Predictor:
    """The newest fitted models of one platform/engine/backend/dtype, ready to predict.

    The backend-independent ops (backend "any") and the collectives measured on this platform
    (engine nccl or gloo, backend = interconnect topology label) are merged in; `interconnect`
    picks the topology where the store holds several."""
    from dooly.fit.predictor import Predictor

    group, meta = load_group(store, platform=platform, engine=engine, backend=backend, dtype=dtype)
    if backend != SHARED_BACKEND and _has_group(meta, platform, engine, SHARED_BACKEND, dtype):
        shared, _ = load_group(store, platform=platform, engine=engine, backend=SHARED_BACKEND, dtype=dtype)
        group = with_shared_ops(group, shared)
    comm = _collective_group(meta, platform=platform, dtype=dtype, interconnect=interconnect)
    if comm is not None:
        collectives, _ = load_group(store, platform=platform, engine=comm[0], backend=comm[1], dtype=dtype)
        group = with_shared_ops(group, collectives)
    return Predictor(group, meta)


def store_predictor(
    store: Store, *, platform: str, engine: str, backend: str, dtype: str, interconnect: str | None = None
) -> Predictor:
    """`load_predictor`, checked against this Dooly's features and able to estimate an op class never
    measured (`dooly.fit.source.open_predictor` for the readers; `dooly plan` reads the store's rows
    from the same open store)."""
    predictor = load_predictor(
        store, platform=platform, engine=engine, backend=backend, dtype=dtype, interconnect=interconnect
    )
    check_feature_widths(predictor, store.uri)
    # An op class never measured here is estimated by the family fallback, fitted on the measured
    # signatures whose config dims the store's inventories hold (read only when needed).
    predictor.inventories = lambda: read_inventories(store).values()
    return predictor


def check_feature_widths(predictor: Predictor, where: str) -> None:
    """Refuse class regressors fitted over another set of physical features than this Dooly builds
    (the attention family gained three in #20): one line saying to fit again, rather than a shape
    error in the middle of a simulation."""
    from dooly.fit.features import FAMILY_FEATURES

    for name, class_model in predictor.group.classes.items():
        expected = FAMILY_FEATURES.get(class_model.family)
        regressor = class_model.regressor
        coef = regressor.coef if regressor.coef is not None else regressor.regime_coef
        if expected is None or coef is None or coef.shape[-1] == len(expected):
            continue
        raise DoolyError(
            f"models in {where} were fitted over {coef.shape[-1]} {class_model.family} features ({name}); this "
            f"Dooly builds {len(expected)}: run `dooly fit --store {where}` again"
        )


def _has_group(meta: dict[str, Any], platform: str, engine: str, backend: str, dtype: str) -> bool:
    wanted = (platform, engine, backend, dtype)
    return any(tuple(entry.get(k) for k in GROUP_COLUMNS) == wanted for entry in meta.get("groups", []))


def collective_groups(meta: dict[str, Any], *, platform: str, dtype: str) -> list[tuple[str, str]]:
    """(communication engine, interconnect label) of the collective groups fitted for a platform."""
    return sorted(
        {
            (str(entry.get("engine")), str(entry.get("backend")))
            for entry in meta.get("groups", [])
            if entry.get("engine") in COMM_ENGINES and entry.get("platform") == platform and entry.get("dtype") == dtype
        }
    )


def _collective_group(
    meta: dict[str, Any], *, platform: str, dtype: str, interconnect: str | None
) -> tuple[str, str] | None:
    found = collective_groups(meta, platform=platform, dtype=dtype)
    if interconnect:
        chosen = [g for g in found if g[1] == interconnect]
        if not chosen:
            known = ", ".join(label for _, label in found) or "none"
            raise DoolyError(
                f"no collectives fitted for interconnect {interconnect!r} on {platform}/{dtype}; known: {known}"
            )
        return chosen[0]
    if len(found) > 1:
        labels = ", ".join(f"{label} ({engine})" for engine, label in found)
        raise DoolyError(
            f"collectives of several interconnects are fitted for {platform}/{dtype}: {labels}; "
            f"choose one with --interconnect"
        )
    return found[0] if found else None

"""Fitted models are data (issue #22): every model kind round-trips through JSON bit for bit, a
loaded store predicts exactly what the in-memory fit does, a reader needs no scikit-learn, and a
store holding pickles is refused without unpickling anything."""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dooly.cli import cli
from dooly.fit import codec
from dooly.fit import synthetic as syn
from dooly.fit.features import term_matrix
from dooly.fit.group import GroupModel, bind_class_model
from dooly.fit.persist import FORMAT_VERSION, load_predictor, serialize_group
from dooly.fit.regressors import (
    ATTENTION_UNSEEN_METHODS,
    SEEN_SCALED,
    UNSEEN_METHODS,
    BoundClassModel,
    fit_class_regressor,
)
from dooly.fit.selection import fit_seen, seen_methods
from dooly.fit.training import class_design, group_data, training_rows
from dooly.store.backends import open_store

GROUP_KEY = (syn.PLATFORM, syn.ENGINE, syn.BACKEND, syn.DTYPE)
PREDICT_ARGS = ["--platform", syn.PLATFORM, "--backend", syn.BACKEND]
STEPS = [([(300, 0)], [50, 900]), ([], [4000] * 32), ([(2048, 4096)], []), ([(17, 3)], [1])]
ROOT = Path(__file__).resolve().parents[2]
SCALED_FACTOR = 1.2345678901234567


def request_grid(n: int = 40) -> dict[str, np.ndarray]:
    """Request points spread over the ranges the synthetic grid measures and beyond it."""
    rng = np.random.default_rng(7)
    tokens = rng.integers(1, 6000, n).astype(float)
    seqs = rng.integers(1, 64, n).astype(float)
    seqs = np.minimum(seqs, tokens)
    return {
        "T": tokens,
        "B": seqs,
        "K": tokens + rng.integers(0, 20000, n),
        "D": np.minimum(seqs, rng.integers(0, 8, n)).astype(float),
        "S": tokens + rng.integers(0, 20000, n),
    }


def every_kind(group: GroupModel) -> GroupModel:
    """The synthetic group plus a model of every kind the codec knows: every seen method on every
    signature family, every class-regressor method on the attention class (the one with most rows)."""
    data = group_data(training_rows(syn.snapshot_frame()))[0]
    signatures = dict(group.signatures)
    by_family: dict[str, int] = {}
    for i, info in enumerate(data.infos):
        by_family.setdefault(info.family, i)
    for i in by_family.values():
        info = data.infos[i]
        rows = data.row_sig == i
        for method in seen_methods(info):
            model = fit_seen(method, info, data.terms[rows], data.seconds[rows])
            if model is not None:
                name = f"{info.signature}:{method}"
                signatures[name] = dataclasses.replace(model, signature=name)
    classes = dict(group.classes)
    design = class_design(data, syn.ATTENTION_CLASS, np.flatnonzero(data.row_class == syn.ATTENTION_CLASS))
    base = group.classes[syn.ATTENTION_CLASS]
    for method in {*ATTENTION_UNSEEN_METHODS, *UNSEEN_METHODS}:
        regressor = fit_class_regressor(method, design.physical, design.logx, design.seconds, design.regimes)
        classes[f"{syn.ATTENTION_CLASS}:{method}"] = type(base)(
            op_class=f"{syn.ATTENTION_CLASS}:{method}",
            family=base.family,
            config_names=base.config_names,
            request_vars=base.request_vars,
            regressor=regressor,
            reference_seqs=base.reference_seqs,
            reference_terms=base.reference_terms,
        )
    # A signature too poor for a model of its own: its class model, scaled (selection.fit_group).
    for i in by_family.values():
        info = data.infos[i]
        name = f"{info.signature}:{SEEN_SCALED}"
        scaled = bind_class_model(classes[info.op_class], info, SCALED_FACTOR, SEEN_SCALED)
        signatures[name] = dataclasses.replace(scaled, signature=name)
    return GroupModel(
        platform=group.platform,
        engine=group.engine,
        backend=group.backend,
        dtype=group.dtype,
        generation=group.generation,
        classes=classes,
        signatures=signatures,
        reports=group.reports,
    )


def assert_same_arrays(a, b, path: str = "") -> None:
    """Every field of two decoded structures equal, arrays bit for bit (dtype and shape too)."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, path
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), path
    elif hasattr(a, "__dataclass_fields__"):
        assert type(a) is type(b), path
        for name in a.__dataclass_fields__:
            assert_same_arrays(getattr(a, name), getattr(b, name), f"{path}.{name}")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same_arrays(a[key], b[key], f"{path}[{key}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_arrays(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), path


def test_every_model_kind_round_trips_bit_for_bit(fitted):
    models, _ = fitted
    group = every_kind(models[GROUP_KEY])
    encoded = json.loads(serialize_group(group))
    assert encoded["schema"] == codec.GROUP_SCHEMA and encoded["format"] == FORMAT_VERSION
    assert {entry["kind"] for entry in encoded["signatures"]} == set(codec.OP_DECODERS)
    methods = {entry["regressor"]["method"] for entry in encoded["classes"]}
    assert methods == {*ATTENTION_UNSEEN_METHODS, *UNSEEN_METHODS}
    loaded = codec.decode_group(encoded)
    assert_same_arrays(group.classes, loaded.classes)
    # Bound class models refer to the group's class model, not a copy of it.
    bound = [m for m in loaded.signatures.values() if isinstance(m, BoundClassModel)]
    assert bound and all(m.model is loaded.classes[m.op_class] for m in bound)
    for name, model in group.signatures.items():
        other = loaded.signatures[name]
        fields = {f: getattr(model, f) for f in model.__dataclass_fields__ if f != "model"}
        assert_same_arrays(fields, {f: getattr(other, f) for f in fields}, name)
    grid = request_grid()
    for name, model in group.signatures.items():
        terms = term_matrix(grid, len(grid["T"]))
        np.testing.assert_array_equal(loaded.signatures[name].predict_terms(terms), model.predict_terms(terms))


def test_loaded_store_predicts_exactly_what_the_fit_did(fitted_store, predictor):
    """Per op (every profiled signature, every inventory op as unseen) and per step: the store's
    models predict the in-memory fit's seconds bit for bit."""
    uri, _ = fitted_store
    loaded = load_predictor(
        open_store(uri, create=False), platform=syn.PLATFORM, engine=syn.ENGINE, backend=syn.BACKEND, dtype=syn.DTYPE
    )
    grid = request_grid()
    n = len(grid["T"])
    assert sorted(loaded.group.signatures) == sorted(predictor.group.signatures)
    for signature, model in predictor.group.signatures.items():
        args = ([signature] * n, [model.op_class] * n, [{}] * n, grid)
        kwargs = {"request_vars": [model.request_vars] * n, "ops": [model.op] * n}
        np.testing.assert_array_equal(loaded.predict_ops(*args, **kwargs), predictor.predict_ops(*args, **kwargs))
    for toy in (*syn.TOY_MODELS, syn.UNSEEN_MODEL):
        inventory = syn.inventory(toy)
        for op in inventory["operations"]:
            args = ([f"new-{op['signature']}"] * n, [op["op_class"]] * n, [op["config_dims"]] * n, grid)
            kwargs = {"request_vars": [op["request_vars"]] * n, "ops": [op["op"]] * n}
            np.testing.assert_array_equal(loaded.predict_ops(*args, **kwargs), predictor.predict_ops(*args, **kwargs))
        for exact in (False, True):
            np.testing.assert_array_equal(
                loaded.step_predictor(inventory, exact=exact).step_seconds_many(STEPS),
                predictor.step_predictor(inventory, exact=exact).step_seconds_many(STEPS),
            )


READ_WITHOUT_SKLEARN = """
import sys
sys.modules["sklearn"] = None  # importing scikit-learn (or any part of it) now fails
from click.testing import CliRunner
from dooly.cli import cli
result = CliRunner().invoke(cli, sys.argv[1:])
assert result.exit_code == 0, result.output
assert not any(name.split(".")[0] == "sklearn" and mod is not None for name, mod in sys.modules.items())
print(result.stdout)
"""


def test_a_reader_without_scikit_learn_predicts(fitted_store):
    uri, _ = fitted_store
    for model in ("toy/gamma-7b", syn.UNSEEN_MODEL.model_id):
        args = ["predict", "--store", uri, "--model", model, *PREDICT_ARGS, "--prefill", "300:0", "--decode", "900"]
        done = subprocess.run(
            [sys.executable, "-c", READ_WITHOUT_SKLEARN, *args, "--output", "json"],
            capture_output=True, text=True, cwd=ROOT, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout)["step_seconds"] > 0


class Payload:
    """What a hostile writer would plant: unpickling it runs code (here: writes a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def planted_store(uri: str, root: Path, marker: Path, *, old_format: bool) -> Path:
    """A copy of the fitted store whose model file is a malicious pickle: under the old .joblib
    name with a format-3 meta.json (as the joblib writer left stores), or under the new name."""
    copy = root / ("old" if old_format else "new")
    shutil.copytree(uri, copy)
    meta_path = next(copy.glob("models/gen-*/meta.json"))
    meta = json.loads(meta_path.read_text())
    blob = pickle.dumps({"format": 3, "group": Payload(marker)})
    for group in meta["groups"]:
        path = copy / group["key"]
        if old_format:
            path.unlink()
            group["key"] = group["key"].removesuffix(".json") + ".joblib"
            path = copy / group["key"]
        path.write_bytes(blob)
    if old_format:
        meta["format"] = 3
        meta.pop("schema", None)
        meta["versions"]["joblib"] = "1.4.2"
    meta_path.write_text(json.dumps(meta))
    return copy


@pytest.mark.parametrize("old_format", [True, False], ids=["joblib-name", "json-name"])
def test_a_planted_pickle_is_never_unpickled(fitted_store, tmp_path, old_format):
    uri, _ = fitted_store
    marker = tmp_path / "marker"
    # The payload works: unpickling it writes the marker (else this test could not fail).
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()
    marker.unlink()
    store = planted_store(uri, tmp_path, marker, old_format=old_format)
    commands = (
        ["predict", "--store", str(store), "--model", "toy/gamma-7b", *PREDICT_ARGS, "--decode", "10"],
        ["simulate", "toy/gamma-7b", "--store", str(store), *PREDICT_ARGS, "--requests", "5"],
    )
    expected = ("model format 3", "joblib") if old_format else ("not a JSON document",)
    for args in commands:
        result = CliRunner().invoke(cli, args)
        assert_one_line_error(result, *expected, "dooly fit")
        assert not marker.exists()


def test_a_meta_that_lists_a_pickle_is_refused_before_reading_it(fitted_store, tmp_path):
    """A meta.json of this format that points at a .joblib file: refused by name, never opened."""
    uri, _ = fitted_store
    marker = tmp_path / "marker"
    copy = tmp_path / "db"
    shutil.copytree(uri, copy)
    meta_path = next(copy.glob("models/gen-*/meta.json"))
    meta = json.loads(meta_path.read_text())
    for group in meta["groups"]:
        group["key"] = group["key"].removesuffix(".json") + ".joblib"
        (copy / group["key"]).write_bytes(pickle.dumps(Payload(marker)))
    meta_path.write_text(json.dumps(meta))
    result = CliRunner().invoke(
        cli, ["predict", "--store", str(copy), "--model", "toy/gamma-7b", *PREDICT_ARGS, "--decode", "10"]
    )
    assert_one_line_error(result, "not a .json model file", "dooly fit")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda doc: doc["signatures"][0].update(kind="os.system"), "unknown model kind 'os.system'"),
        (lambda doc: doc["signatures"][0].pop("method"), "missing"),
        (lambda doc: doc["classes"][0]["reference_terms"].update(dtype="object"), "dtype 'object'"),
        (lambda doc: doc.update(format=FORMAT_VERSION + 1), f"format {FORMAT_VERSION + 1}"),
    ],
    ids=["unknown-kind", "missing-field", "bad-dtype", "newer-format"],
)
def test_a_malformed_model_file_is_one_line(fitted_store, tmp_path, change, fragment):
    uri, _ = fitted_store
    copy = tmp_path / "db"
    shutil.copytree(uri, copy)
    (path,) = [p for p in copy.glob("models/gen-*/*.json") if p.name != "meta.json"]
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))
    result = CliRunner().invoke(
        cli, ["predict", "--store", str(copy), "--model", "toy/gamma-7b", *PREDICT_ARGS, "--decode", "10"]
    )
    assert_one_line_error(result, fragment, "dooly fit")

"""`dooly fit` / `dooly predict` on a real local store: persistence, versions, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dooly import SCHEMA_VERSION
from dooly.cli import cli
from dooly.errors import DoolyError
from dooly.fit import synthetic as syn
from dooly.fit.persist import fit_store, load_predictor
from dooly.store.backends import LocalStore, open_store

PREDICT_BASE = ["--platform", syn.PLATFORM, "--backend", syn.BACKEND]


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_fit_persists_models_with_versions_and_generation(fitted_store):
    uri, report = fitted_store
    meta = json.loads((Path(uri) / report["meta_key"]).read_text())
    assert report["meta_key"] == "models/gen-000001/meta.json"
    assert meta["generation"] == 1
    assert set(meta["versions"]) >= {"scikit-learn", "numpy", "dooly"}
    (group,) = meta["groups"]
    assert (Path(uri) / group["key"]).is_file()
    assert {c["op_class"] for c in group["classes"]} == {syn.MM, syn.MUL, syn.SILU, syn.ATTENTION_CLASS}
    assert len(meta["leave_one_model_out"]) == len(syn.TOY_MODELS)
    assert "fold" in report["validation"]


def test_loaded_predictor_matches_the_in_memory_fit(fitted_store, predictor):
    uri, _ = fitted_store
    loaded = load_predictor(
        open_store(uri, create=False),
        platform=syn.PLATFORM,
        engine=syn.ENGINE,
        backend=syn.BACKEND,
        dtype=syn.DTYPE,
    )
    assert loaded.generation == 1
    steps = [([(300, 0)], [50, 900]), ([], [4000] * 32), ([(2048, 4096)], [])]
    for model in (syn.TOY_MODELS[0], syn.UNSEEN_MODEL):
        inventory = syn.inventory(model)
        np.testing.assert_allclose(
            loaded.step_predictor(inventory).step_seconds_many(steps),
            predictor.step_predictor(inventory).step_seconds_many(steps),
            rtol=1e-12,
        )


def test_fit_text_output_reports_both_errors(fitted_store, tmp_path):
    uri, _ = fitted_store
    copy = tmp_path / "db"
    shutil.copytree(uri, copy)
    result = invoke("fit", "--store", str(copy), "--folds", "2", "--repeats", "2")
    assert result.exit_code == 0, result.output
    for fragment in (
        "seen MAPE med",
        "unseen MAPE med",
        "2-fold",
        "repeated 2 times",
        "all profiled signatures (31)",
        "leave one model out",
        syn.ATTENTION_CLASS,
        "toy/beta-3b",
    ):
        assert fragment in result.stdout


def test_predict_cli_step_and_breakdown(fitted_store):
    uri, _ = fitted_store
    result = invoke(
        "predict", "--store", uri, "--model", "toy/gamma-7b", *PREDICT_BASE,
        "--prefill", "512:0", "--decode", "1000", "--decode", "3000", "--per-op", "--output", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["step_seconds"] > 0
    assert sum(payload["breakdown_seconds"].values()) == pytest.approx(payload["step_seconds"], rel=1e-9)
    assert payload["unseen_ops"] == 0 and payload["ops"] == len(payload["operations"])
    text = invoke("predict", "--store", uri, "--model", "omega-5b", *PREDICT_BASE, "--decode", "100")
    assert text.exit_code == 0, text.output
    assert "unseen (predicted from config dims): 8" in text.stdout
    assert syn.ATTENTION_CLASS in text.stdout


def test_models_from_another_scikit_learn_are_read(fitted_store, tmp_path):
    """Models are data: the writer's scikit-learn version is recorded, not required of a reader."""
    uri, report = fitted_store
    copy = tmp_path / "db"
    shutil.copytree(uri, copy)
    meta_path = copy / report["meta_key"]
    meta = json.loads(meta_path.read_text())
    meta["versions"]["scikit-learn"] = "0.20.0"
    meta_path.write_text(json.dumps(meta))
    loaded = load_predictor(
        open_store(str(copy), create=False),
        platform=syn.PLATFORM,
        engine=syn.ENGINE,
        backend=syn.BACKEND,
        dtype=syn.DTYPE,
    )
    assert loaded.meta["versions"]["scikit-learn"] == "0.20.0"
    result = invoke(
        "predict", "--store", str(copy), "--model", "toy/gamma-7b", *PREDICT_BASE, "--decode", "10"
    )
    assert result.exit_code == 0, result.output


def test_models_of_the_previous_format_fail_clearly(fitted_store, tmp_path):
    """Models of format 3 (joblib pickles) are refused, never opened, with one line naming the fix."""
    from dooly.fit.persist import FORMAT_VERSION

    uri, report = fitted_store
    copy = tmp_path / "db"
    shutil.copytree(uri, copy)
    meta_path = copy / report["meta_key"]
    meta = json.loads(meta_path.read_text())
    meta["format"] = FORMAT_VERSION - 1
    meta_path.write_text(json.dumps(meta))
    result = invoke(
        "predict", "--store", str(copy), "--model", "toy/gamma-7b", *PREDICT_BASE, "--decode", "10"
    )
    assert_one_line_error(result, f"model format {FORMAT_VERSION - 1}", "joblib", "dooly fit")


def test_predict_bad_inputs_exit_2(fitted_store, tmp_path):
    uri, _ = fitted_store
    base = ["predict", "--store", uri, "--model", "toy/gamma-7b"]
    assert_one_line_error(
        invoke(*base, "--platform", "NoSuchGPU", "--backend", syn.BACKEND, "--decode", "5"),
        "platform",
        "NoSuchGPU",
    )
    assert_one_line_error(
        invoke(*base, "--platform", syn.PLATFORM, "--backend", "flash", "--decode", "5"), "backend", "flash"
    )
    assert_one_line_error(invoke(*base, *PREDICT_BASE, "--prefill", "abc"), "--prefill")
    assert_one_line_error(invoke(*base, *PREDICT_BASE, "--decode", "0"), "--decode")
    assert_one_line_error(invoke(*base, *PREDICT_BASE), "empty step")
    assert_one_line_error(
        invoke("predict", "--store", uri, "--model", "nobody/none", *PREDICT_BASE, "--decode", "5"),
        "nobody/none",
    )
    unfitted = tmp_path / "unfitted"
    open_store(str(unfitted))
    assert_one_line_error(
        invoke("predict", "--store", str(unfitted), "--model", "x", *PREDICT_BASE, "--decode", "5"),
        "no fitted models",
    )


def test_fit_bad_stores_exit_2(tmp_path):
    assert_one_line_error(invoke("fit", "--store", str(tmp_path / "missing")))
    empty = tmp_path / "empty"
    open_store(str(empty))
    assert_one_line_error(invoke("fit", "--store", str(empty)), "no snapshot")
    other = tmp_path / "other"
    other.mkdir()
    (other / "dooly-store.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1}))
    assert_one_line_error(invoke("fit", "--store", str(other)), "schema version")


class FailingMetaStore(LocalStore):
    """A store whose disk fills up just as the fit writes its meta.json."""

    def put_bytes(self, key: str, data: bytes) -> None:
        if key.endswith("meta.json"):
            raise DoolyError(f"store {self.uri}: no space left writing {key}")
        super().put_bytes(key, data)


def test_failed_fit_leaves_no_half_written_models(tmp_path, store_factory):
    uri = store_factory(
        tmp_path / "db",
        {syn.inventory_store_key(syn.TOY_MODELS[0]): syn.inventory(syn.TOY_MODELS[0])},
        models=syn.TOY_MODELS[:2],
    )
    store = FailingMetaStore(uri)
    with pytest.raises(DoolyError, match="no space left"):
        fit_store(store, folds=2)
    assert store.list_keys("models/") == []

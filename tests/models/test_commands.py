"""`dooly models` through the real CLI entry point."""

from __future__ import annotations

import json

from click.testing import CliRunner

from dooly.cli import cli
from dooly.models.registry import bundled_model_ids, resolve_model


def test_table_lists_every_bundled_model():
    result = CliRunner().invoke(cli, ["models"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for model_id in bundled_model_ids():
        assert any(line.startswith(model_id + " ") for line in lines), model_id
    mixtral = next(line for line in lines if line.startswith("mistralai/Mixtral"))
    assert "8 (top 2)" in mixtral


def test_json_matches_the_config_files():
    result = CliRunner().invoke(cli, ["models", "--output", "json"])
    assert result.exit_code == 0, result.output
    rows = {row["model_id"]: row for row in json.loads(result.stdout)["models"]}
    assert set(rows) == set(bundled_model_ids())
    for model_id, row in rows.items():
        facts = resolve_model(model_id).config
        assert row["layers"] == facts["num_hidden_layers"]
        assert row["hidden_size"] == facts["hidden_size"]
        assert row["vocab_size"] == facts["vocab_size"]
        assert row["head_dim"] == facts.get(
            "head_dim", facts["hidden_size"] // facts["num_attention_heads"]
        )
    gemma = rows["google/gemma-2-9b"]
    assert gemma["sliding_window"] == 4096
    assert gemma["sliding_window_layers"] == gemma["layers"] // 2
    assert rows["Qwen/Qwen2.5-7B"]["sliding_window"] is None


def test_named_model_and_config_path(tmp_path):
    config = dict(resolve_model("Qwen/Qwen2.5-7B").config, num_hidden_layers=4)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    result = CliRunner().invoke(cli, ["models", "qwen2.5-7b", str(path), "--output", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["models"]
    assert [row["layers"] for row in rows] == [28, 4]
    assert rows[1]["source"] == str(path)


def test_bad_input_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "llama", "hidden_size": 0}')
    for args in (
        ["models", "no-such-model"],
        ["models", str(bad)],
        ["models", str(tmp_path / "x.json")],
    ):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, (args, result.output)
        assert result.stdout == ""
        assert len(result.stderr.strip().splitlines()) == 1
        assert result.stderr.startswith("error: ")
    result = CliRunner().invoke(cli, ["models", str(bad)])
    assert "hidden_size" in result.stderr


def test_help_teaches_with_examples():
    result = CliRunner().invoke(cli, ["models", "--help"])
    assert result.exit_code == 0
    assert "dooly models ./my-model/config.json" in result.stdout

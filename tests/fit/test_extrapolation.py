"""Coverage says how much device time measured signatures spend beyond the sizes they were measured
at (dooly.fit.extent): the fit records each signature's largest measured request variables, per
batch regime for attention; steps past them are reported per phase, and a store fitted before
they were recorded reports nothing of it, without failing."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from dooly.cli import cli
from dooly.fit import codec
from dooly.fit import synthetic as syn
from dooly.fit.coverage import CONTEXT_STEP, coverage_lines, coverage_payload, payload_lines, plan_flags
from dooly.fit.extent import ANY_REGIME, LONGEST_KV, MeasuredExtent
from dooly.fit.features import REGIME_DECODE, REGIME_MIXED, REGIME_PREFILL, aggregates_from_seqs
from dooly.fit.persist import serialize_group
from dooly.fit.predictor import PHASE_DECODE, PHASE_PREFILL, Predictor
from dooly.profile.grid import DEFAULT_MAX_KV, GridSpec, attention_batches, kv_limit_reaching, longest_kv, widen

TOY = syn.TOY_MODELS[0]
GROUP_KEY = (syn.PLATFORM, syn.ENGINE, syn.BACKEND, syn.DTYPE)
PREDICT_ARGS = ["--model", TOY.model_id, "--platform", syn.PLATFORM, "--backend", syn.BACKEND]
# The synthetic grid measures every T-only operation up to the top of its token ladder.
MEASURED_TOKENS = max(syn.T_GRID)
BEYOND_TOKENS = 2 * MEASURED_TOKENS
# Steps inside everything every toy signature was measured at (per regime, for attention).
INSIDE_STEPS = [([(256, 0)], []), ([], [300, 900, 1500]), ([(64, 0)], [400, 500, 600])]
# A decode step of long prompts: sequences longer, and a KV total larger, than the default grid's decodes.
LONG_DECODE_CONTEXT = 12000
LONG_DECODES = 40
# A KV total past the default limit that the default grid's largest decode batches still read.
LARGE_KV_FACTOR = 4


def attention_maxima(regime: int) -> dict[str, int]:
    """The largest T, B, K and L of the synthetic attention points of one batch regime."""
    points = syn.attention_points()
    agg = aggregates_from_seqs(points, 0)
    d, b = agg["D"], agg["B"]
    of_regime = np.where(d <= 0, REGIME_PREFILL, np.where(d >= b, REGIME_DECODE, REGIME_MIXED)) == regime
    chosen = [p for p, keep in zip(points, of_regime, strict=True) if keep]
    return {
        "T": int(agg["T"][of_regime].max()),
        "B": int(agg["B"][of_regime].max()),
        "K": int(agg["K"][of_regime].max()),
        LONGEST_KV: max(q + ctx for point in chosen for q, ctx in point),
    }


def toy_step(predictor: Predictor):
    return predictor.step_predictor(syn.inventory(TOY))


def test_the_fit_records_each_signature_s_measured_maxima(predictor):
    extents = predictor.group.extents
    assert set(extents) == set(predictor.group.signatures)
    for operation in syn.model_operations(TOY):
        extent = extents[operation["signature"]]
        if operation["op"] == "attention":
            assert set(extent.maxima) == {"prefill", "decode", "mixed"}
            for regime, name in ((REGIME_PREFILL, "prefill"), (REGIME_DECODE, "decode"), (REGIME_MIXED, "mixed")):
                assert {var: extent.maxima[name][var] for var in ("T", "B", "K", LONGEST_KV)} == attention_maxima(regime)
        else:
            (var,) = operation["request_vars"]
            expected = max(syn.T_GRID) if var == "T" else max(syn.B_GRID)
            assert extent.maxima == {ANY_REGIME: {var: expected}}


def test_steps_beyond_the_measured_tokens_are_extrapolated_and_named(predictor):
    coverage = toy_step(predictor).coverage_by_phase([([(BEYOND_TOKENS, 0)], []), ([(128, 0)], [])])
    prefill = coverage[PHASE_PREFILL]
    # Every op of the long prefill but the lm_head (one row per sequence: B) is priced beyond its
    # measured tokens, none of the short one's.
    long_only = toy_step(predictor).coverage_many([([(BEYOND_TOKENS, 0)], [])]).seconds
    assert 0.0 < prefill.extrapolated_share < long_only / prefill.seconds < 1.0
    assert prefill.measured_share == 1.0  # the three shares are unchanged: all of it is measured
    assert prefill.token_budget_needed == BEYOND_TOKENS
    by_class = {e.op_class: e for e in prefill.extrapolated}
    mm = by_class[syn.MM]
    assert (mm.variable, mm.measured_max, mm.needed_max) == ("T", MEASURED_TOKENS, BEYOND_TOKENS)
    attention = by_class[syn.ATTENTION_CLASS]
    assert attention.variable == "T"
    assert (attention.measured_max, attention.needed_max) == (attention_maxima(REGIME_PREFILL)["T"], BEYOND_TOKENS)
    assert all(e.variable == "T" for e in prefill.extrapolated)
    assert not any(e.op_class == syn.MM and e.variable == "B" for e in prefill.extrapolated)
    payload = prefill.to_dict()
    assert payload["extrapolated_share"] == prefill.extrapolated_share
    assert {
        (e["op_class"], e["variable"], e["measured_max"], e["needed_max"]) for e in payload["extrapolated"]
    } >= {(syn.MM, "T", MEASURED_TOKENS, BEYOND_TOKENS)}
    assert sum(e["share"] for e in payload["extrapolated"]) == pytest.approx(prefill.extrapolated_share)
    (line,) = [line for line in coverage_lines(coverage, plan="dooly plan X") if "extrapolated" in line]
    assert f"T (tokens) up to {BEYOND_TOKENS}" in line
    assert f"measured up to {attention_maxima(REGIME_PREFILL)['T']} for {syn.ATTENTION_CLASS}" in line
    assert line.endswith(f"; `dooly plan X --token-budget {BEYOND_TOKENS}` measures steps of that many tokens")
    assert coverage_payload(coverage)[PHASE_PREFILL]["plan_flags"] == [f"--token-budget {BEYOND_TOKENS}"]


def test_decode_contexts_beyond_the_measured_ones_extrapolate_attention_only(predictor):
    longest = attention_maxima(REGIME_DECODE)[LONGEST_KV]
    coverage = toy_step(predictor).coverage_by_phase([([], [2 * longest, 100])])[PHASE_DECODE]
    (attention,) = coverage.extrapolated
    assert attention.op_class == syn.ATTENTION_CLASS
    assert attention.variable == LONGEST_KV
    assert (attention.measured_max, attention.needed_max) == (longest, 2 * longest + 1)
    assert coverage.token_budget_needed is None
    assert not any("--token-budget" in line for line in coverage_lines({PHASE_DECODE: coverage}))


def test_attention_is_checked_against_its_own_regime_s_maxima(predictor):
    """A mixed step of more tokens than any measured mixed batch but fewer than the measured
    prefills: beyond attention's mixed measurements, inside every other op's."""
    mixed_tokens = attention_maxima(REGIME_MIXED)["T"]
    chunk = (mixed_tokens + attention_maxima(REGIME_PREFILL)["T"]) // 2
    coverage = toy_step(predictor).coverage_many([([(chunk, 0)], [400, 500])])
    (attention,) = coverage.extrapolated
    assert attention.op_class == syn.ATTENTION_CLASS
    assert (attention.variable, attention.measured_max, attention.needed_max) == ("T", mixed_tokens, chunk + 2)


def test_steps_inside_the_measured_sizes_extrapolate_nothing(predictor):
    for coverage in toy_step(predictor).coverage_by_phase(INSIDE_STEPS).values():
        assert coverage.extrapolated_share == 0.0
        assert coverage.extrapolated == [] and coverage.token_budget_needed is None
        assert coverage.to_dict()["extrapolated"] == []
    assert not any("extrapolated" in line for line in coverage_lines(toy_step(predictor).coverage_by_phase(INSIDE_STEPS)))


def test_extents_round_trip_and_a_group_without_them_reports_nothing(fitted):
    models, _ = fitted
    group = models[GROUP_KEY]
    document = json.loads(serialize_group(group))
    assert codec.decode_group(document).extents == group.extents
    document.pop("measured_extents")
    old = codec.decode_group(document)
    assert old.extents == {}
    coverage = Predictor(old).step_predictor(syn.inventory(TOY)).coverage_by_phase([([(BEYOND_TOKENS, 0)], [])])
    prefill = coverage[PHASE_PREFILL]
    assert prefill.extrapolated_share is None and prefill.extrapolated == []
    assert prefill.to_dict()["unchecked_share"] == 1.0
    assert not any("extrapolated" in line for line in coverage_lines(coverage))


def test_a_regime_never_measured_takes_the_largest_of_the_others():
    extent = MeasuredExtent({"prefill": {"T": 4096, "B": 8}, "mixed": {"T": 2112, "B": 65}})
    limits = extent.limits(("T", "B", LONGEST_KV))
    assert set(limits) == {"T", "B"}  # L was never recorded: it is not checked
    assert limits["T"].tolist() == [4096.0, 4096.0, 2112.0]
    assert limits["B"].tolist() == [8.0, 65.0, 65.0]


def test_predict_reports_the_extrapolation_in_json_and_text(fitted_store, tmp_path):
    uri, _ = fitted_store
    step = ["--prefill", f"{BEYOND_TOKENS}:0"]
    result = CliRunner().invoke(cli, ["predict", "--store", uri, *PREDICT_ARGS, *step, "--output", "json"])
    assert result.exit_code == 0, result.output
    prefill = json.loads(result.stdout)["coverage"]["prefill"]
    # One step, every op but the lm_head (its B is one sequence) beyond its measured tokens.
    assert 0.9 < prefill["extrapolated_share"] < 1.0
    assert prefill["measured_share"] == 1.0 and prefill["token_budget_needed"] == BEYOND_TOKENS
    assert {"signature", "op_class", "variable", "measured_max", "needed_max", "share"} <= set(prefill["extrapolated"][0])
    text = CliRunner().invoke(cli, ["predict", "--store", uri, *PREDICT_ARGS, *step])
    assert text.exit_code == 0, text.output
    (line,) = [line for line in text.output.splitlines() if "extrapolated" in line]
    share = f"{100 * prefill['extrapolated_share']:.1f}%"
    assert line.startswith(f"  extrapolated: {share} of predicted device time at sizes beyond those measured")
    assert f"dooly plan {TOY.model_id} --store {uri} --platform '{syn.PLATFORM}'" in line
    assert f"--token-budget {BEYOND_TOKENS}" in line

    # A store fitted before extents were recorded: the same answer, nothing said of extrapolation.
    copy = tmp_path / "db"
    shutil.copytree(uri, copy)
    for path in copy.glob("models/gen-*/*.json"):
        document = json.loads(path.read_text())
        if document.pop("measured_extents", None) is not None:
            path.write_text(json.dumps(document))
    old = CliRunner().invoke(cli, ["predict", "--store", str(copy), *PREDICT_ARGS, *step, "--output", "json"])
    assert old.exit_code == 0, old.output
    old_prefill = json.loads(old.stdout)["coverage"]["prefill"]
    assert old_prefill["extrapolated_share"] is None and old_prefill["extrapolated"] == []
    assert old_prefill["measured_share"] == prefill["measured_share"]
    old_text = CliRunner().invoke(cli, ["predict", "--store", str(copy), *PREDICT_ARGS, *step])
    assert old_text.exit_code == 0 and "extrapolated" not in old_text.output


def test_long_sequences_name_the_context_and_kv_that_measure_them(predictor):
    """Decodes of long prompts, past every length and KV total the grid measures: coverage records
    the longest sequence's KV and the KV total needed, and names the `--context` (rounded up) and
    `--max-kv` whose points hold such a step: a decode batch at least that long and that large."""
    coverage = toy_step(predictor).coverage_by_phase([([], [LONG_DECODE_CONTEXT] * LONG_DECODES), ([], [100])])
    decode = coverage[PHASE_DECODE]
    longest, kv = LONG_DECODE_CONTEXT + 1, LONG_DECODES * (LONG_DECODE_CONTEXT + 1)
    assert (decode.context_needed, decode.kv_needed, decode.token_budget_needed) == (longest, kv, None)
    assert {"context_needed": longest, "kv_needed": kv}.items() <= decode.to_dict().items()
    payload = coverage_payload(coverage)[PHASE_DECODE]
    context = CONTEXT_STEP * math.ceil(longest / CONTEXT_STEP)
    grid = widen(GridSpec(), contexts=(context,))
    limit = kv_limit_reaching(kv, PHASE_DECODE, grid)
    assert limit is not None and limit > DEFAULT_MAX_KV
    assert payload["plan_flags"] == [f"--context {context}", f"--max-kv {limit}"]
    measured = widen(dataclasses.replace(grid, max_kv=limit))
    assert any(b.decode_seqs == b.num_seqs and b.kv_tokens >= kv for b in attention_batches(measured))
    assert longest_kv(grid, PHASE_DECODE) >= longest
    (line,) = [line for line in coverage_lines(coverage, plan="dooly plan X") if "extrapolated" in line]
    assert line.endswith(f"; `dooly plan X --context {context} --max-kv {limit}` measures steps of those sizes")
    assert payload_lines(coverage_payload(coverage), "dooly plan X") == coverage_lines(coverage, plan="dooly plan X")


def test_sizes_the_default_grid_holds_name_no_flag_and_old_payloads_still_read():
    """A longest sequence or KV total the default grid already reaches (a store profiled on a
    smaller grid) names no --context or --max-kv: a plain plan measures them. A payload written
    before plan_flags, context_needed and kv_needed were recorded reads as before."""
    assert plan_flags(PHASE_DECODE, {"context_needed": longest_kv(GridSpec(), PHASE_DECODE),
                                     "kv_needed": DEFAULT_MAX_KV // 2}) == []
    assert plan_flags(PHASE_PREFILL, {"token_budget_needed": BEYOND_TOKENS, "context_needed": BEYOND_TOKENS}) == [
        f"--token-budget {BEYOND_TOKENS}"]
    # Explore's total over every phase: batches of any regime.
    kv = LARGE_KV_FACTOR * DEFAULT_MAX_KV
    limit = kv_limit_reaching(kv, None, GridSpec())
    assert limit is not None and plan_flags("all", {"kv_needed": kv}) == [f"--max-kv {limit}"]
    extrapolated = [{"variable": "T", "measured_max": MEASURED_TOKENS, "needed_max": BEYOND_TOKENS, "share": 0.5,
                     "op_class": syn.MM, "signature": "0" * 40}]
    old = {"measured_share": 1.0, "class_regressor_share": 0.0, "fallback_share": 0.0, "estimated": [],
           "extrapolated_share": 0.5, "token_budget_needed": BEYOND_TOKENS, "extrapolated": extrapolated}
    (_, line) = payload_lines({PHASE_PREFILL: old}, "dooly plan X")
    assert line.endswith(f"; `dooly plan X --token-budget {BEYOND_TOKENS}` measures steps of that many tokens")
    (_, line) = payload_lines({PHASE_PREFILL: {**old, "token_budget_needed": None}}, "dooly plan X")
    assert "dooly plan" not in line


def test_predict_names_the_plan_flags_in_json_and_text(fitted_store):
    uri, _ = fitted_store
    step = [arg for _ in range(LONG_DECODES) for arg in ("--decode", str(LONG_DECODE_CONTEXT))]
    result = CliRunner().invoke(cli, ["predict", "--store", uri, *PREDICT_ARGS, *step, "--output", "json"])
    assert result.exit_code == 0, result.output
    decode = json.loads(result.stdout)["coverage"][PHASE_DECODE]
    assert (decode["context_needed"], decode["kv_needed"]) == (LONG_DECODE_CONTEXT + 1, LONG_DECODES * (LONG_DECODE_CONTEXT + 1))
    flags = decode["plan_flags"]
    assert flags == plan_flags(PHASE_DECODE, decode) and [flag.split()[0] for flag in flags] == ["--context", "--max-kv"]
    text = CliRunner().invoke(cli, ["predict", "--store", uri, *PREDICT_ARGS, *step])
    assert text.exit_code == 0, text.output
    (line,) = [line for line in text.output.splitlines() if "extrapolated" in line]
    assert line.endswith(f"--attention '{syn.BACKEND}' {' '.join(flags)}` measures steps of those sizes")

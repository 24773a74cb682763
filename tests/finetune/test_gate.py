"""The promotion gate (finetune.evaluation.gate): pure, metrics in and a verdict out; no store, no model."""

from __future__ import annotations

import pytest

from finetune.evaluation.gate import GateConfig, gate
from tests.finetune.registry_fixtures import GOOD


def test_gate_passes_an_equal_or_better_candidate():
    assert gate(GOOD, GOOD).passed
    better = GOOD | {"heldout_loss": 0.8, "heldout_exact_match": 0.6}
    verdict = gate(better, GOOD, candidate_label="v2", active_label="v1")
    assert verdict.passed and verdict.against == "v1"
    assert "no worse than v1" in verdict.reasons[0]


@pytest.mark.parametrize("change, words", [
    ({"heldout_loss": 1.03}, "held-out loss 1.030 is higher than active's 1.000"),
    ({"heldout_exact_match": 0.47}, "exact match 47.0% is below"),
    ({"heldout_token_f1": 0.60}, "token F1 60.0% is below"),
    ({"stop_rate": 0.85}, "stops at the end of its turn in 85.0%"),
    ({"n_heldout": 0}, "no held-out examples"),
    ({"heldout_token_f1": None}, "token F1 could not be measured"),
])
def test_gate_fails_a_worse_candidate_and_says_why(change, words):
    verdict = gate(GOOD | change, GOOD)
    assert not verdict.passed
    assert any(words in r for r in verdict.reasons), verdict.reasons


def test_gate_tolerances_are_inclusive_and_configurable():
    # Within 2 % on loss and 2 points on scores: still "no worse".
    assert gate(GOOD | {"heldout_loss": 1.019, "heldout_exact_match": 0.481, "heldout_token_f1": 0.681}, GOOD).passed
    strict = GateConfig(loss_rel_tolerance=0.0, score_tolerance=0.0)
    assert not gate(GOOD | {"heldout_loss": 1.001}, GOOD, config=strict).passed
    # Forgetting and training reproduction are reported, not gated.
    assert gate(GOOD | {"forgetting_delta": 3.0, "train_reproduced": 0.0}, GOOD).passed


def test_gate_requires_keeping_the_answers_the_active_adapter_reproduces():
    forgetful = GOOD | {"retained_vs_active": 0.9, "n_active_reproduced": 40}
    verdict = gate(forgetful, GOOD, candidate_label="v2", active_label="v1")
    assert not verdict.passed
    assert "reproduces 90.0% of the 40 training answers v1 reproduces (at least 95% must be kept)" in verdict.reasons
    assert "answers kept (vs active)" in verdict.table
    kept = gate(GOOD | {"retained_vs_active": 0.95, "n_active_reproduced": 40}, GOOD, active_label="v1")
    assert kept.passed and "keeps 95.0% of the 40 answers v1 reproduces" in kept.reasons[0]
    # Fewer than 10 reproduced answers say little (a real base reproduces few exactly): reported, not gated.
    assert gate(GOOD | {"retained_vs_active": 0.5, "n_active_reproduced": 4}, GOOD).passed


def _paired(em: list[float], stopped: list[bool] | None = None) -> dict:
    stopped = stopped or [True] * len(em)
    return {f"q{i}": {"em": e, "f1": e, "stopped": s} for i, (e, s) in enumerate(zip(em, stopped))}


def test_gate_fails_a_score_drop_only_with_paired_evidence():
    """On 12 held-out questions one answer lost is 8 points of exact match: within chance, said but not failed.
    Five lost and none won is evidence (sign test p = 1/32)."""
    active = GOOD | {"n_heldout": 12, "heldout_exact_match": 6 / 12, "heldout_token_f1": 6 / 12,
                     "paired": _paired([1.0] * 6 + [0.0] * 6)}
    one_lost = GOOD | {"n_heldout": 12, "heldout_exact_match": 5 / 12, "heldout_token_f1": 5 / 12,
                       "paired": _paired([0.0] + [1.0] * 5 + [0.0] * 6)}
    verdict = gate(one_lost, active, active_label="v1")
    assert verdict.passed, verdict.reasons
    assert any("1 answers worse, 0 better, within chance (p=0.50)" in r for r in verdict.reasons), verdict.reasons
    five_lost = GOOD | {"n_heldout": 12, "heldout_exact_match": 1 / 12, "heldout_token_f1": 1 / 12,
                        "paired": _paired([0.0] * 5 + [1.0] + [0.0] * 6)}
    verdict = gate(five_lost, active, active_label="v1")
    assert not verdict.passed
    assert any("exact match 8.3% is below v1's 50.0%" in r and "5 answers worse, 0 better, p=0.031" in r
               for r in verdict.reasons), verdict.reasons
    # Lost on some, won on others as often: no evidence either way.
    swapped = GOOD | {"n_heldout": 12, "heldout_exact_match": 4 / 12, "heldout_token_f1": 4 / 12,
                      "paired": _paired([0.0] * 4 + [1.0] * 2 + [1.0] * 2 + [0.0] * 4)}
    assert gate(swapped, active).passed
    # Without per-question records (metadata from before they were kept) the tolerances decide alone.
    assert not gate(one_lost | {"paired": None}, active).passed


def test_gate_fails_a_stop_rate_drop_only_with_paired_evidence():
    active = GOOD | {"stop_rate": 1.0, "paired": _paired([0.5] * 10)}
    one = GOOD | {"stop_rate": 0.9, "paired": _paired([0.5] * 10, [False] + [True] * 9)}
    verdict = gate(one, active)
    assert verdict.passed and any("1 fewer stop, 0 more, within chance" in r for r in verdict.reasons)
    six = GOOD | {"stop_rate": 0.4, "paired": _paired([0.5] * 10, [False] * 6 + [True] * 4)}
    verdict = gate(six, active)
    assert not verdict.passed and any("(6 fewer answers stop, 0 more, p=0.016)" in r for r in verdict.reasons)


def test_paired_sign_test_pairs_by_question():
    from finetune.evaluation.gate import paired_sign_test

    mine = {"a": {"em": 0.0}, "b": {"em": 1.0}, "c": {"em": 0.0}}
    theirs = {"a": {"em": 1.0}, "b": {"em": 0.0}, "d": {"em": 1.0}}  # c and d were asked of only one side
    assert paired_sign_test(mine, theirs, "em") == (1, 1, 0.75)
    assert paired_sign_test(None, theirs, "em") == (0, 0, None)
    assert paired_sign_test({"a": {"em": 1.0}}, {"a": {"em": 1.0}}, "em") == (0, 0, 1.0)


def test_compare_with_active_measures_retention_and_forgetting_against_the_previous_adapter():
    from finetune.evaluation.gate import compare_with_active

    candidate = {"reproduced_keys": ["a", "b", "c"], "forgetting_adapter_loss": 5.5}
    compare_with_active(candidate, {"reproduced_keys": ["a", "b", "d", "e"], "forgetting_adapter_loss": 5.0})
    assert candidate["retained_vs_active"] == 0.5 and candidate["n_active_reproduced"] == 4
    assert candidate["forgetting_vs_active"] == pytest.approx(0.5)


def test_gate_against_a_base_without_measurements_only_needs_the_candidate_measured():
    assert gate(GOOD, {}).passed


def test_gate_table_has_both_columns_and_signed_deltas():
    table = gate(GOOD | {"heldout_loss": 0.9, "heldout_token_f1": 0.75}, GOOD,
                 candidate_label="v2", active_label="v1").table
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["metric", "v2", "v1"]
    loss = next(line for line in lines if line.startswith("held-out loss"))
    assert "0.900" in loss and "1.000" in loss and "-0.100" in loss and loss.endswith("better")
    f1 = next(line for line in lines if line.startswith("held-out token F1"))
    assert "75.0%" in f1 and "+5.0" in f1
    assert any(line.startswith("forgetting (vs base)") for line in lines)


def test_gate_judges_a_preference_candidate_on_the_voted_answers_too():
    """kto / dpo candidates carry the voted answers' mean log-likelihoods (theirs and the active's, measured on the
    same votes): 👎'd answers must become less likely, 👍'd ones no less likely; held-out rules apply as ever."""
    active = {**GOOD, "pref_desirable_loglik": -1.0, "pref_undesirable_loglik": -2.0}
    moved = {**GOOD, "pref_desirable_loglik": -0.9, "pref_undesirable_loglik": -2.5}
    verdict = gate(moved, active)
    assert verdict.passed, verdict.reasons
    assert "log-likelihood, downvoted answers" in verdict.table and "-0.500" in verdict.table

    unmoved = gate({**moved, "pref_undesirable_loglik": -2.0}, active)
    assert not unmoved.passed and any("👎'd answers did not become less likely" in r for r in unmoved.reasons)
    lost = gate({**moved, "pref_desirable_loglik": -1.2}, active)
    assert not lost.passed and any("👍'd answers became less likely" in r for r in lost.reasons)
    assert gate({**moved, "pref_desirable_loglik": -1.2}, active,
                config=GateConfig(preference_tolerance=0.25)).passed
    worse_heldout = gate({**moved, "heldout_loss": 2.0}, active)
    assert not worse_heldout.passed and any("held-out loss" in r for r in worse_heldout.reasons)
    # An SFT candidate carries no such numbers and is judged as before; its table has no such rows.
    plain = gate(GOOD, active)
    assert plain.passed and "downvoted" in plain.table  # the active's number is shown beside n/a
    assert "downvoted" not in gate(GOOD, GOOD).table
    missing = gate(moved, GOOD)
    assert not missing.passed and any("could not be compared" in r for r in missing.reasons)

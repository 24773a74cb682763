"""Evaluation: text metrics (fast) and the model-side measurements on the tiny base (slow)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from finetune.evaluation.metrics import (
    METRIC_KEYS,
    answer_ids,
    answer_loss,
    answer_tokens,
    evaluate,
    exact_match,
    generate_answers,
    metrics_table,
    prompt_ids,
    sample_for_reproduction,
    token_f1,
)
from finetune.training.general_text import GENERAL_TEXT_PATH, load_general_text

# --- text metrics ---------------------------------------------------------------------------------


def test_answer_tokens_words_and_cjk_characters():
    assert answer_tokens("The VPN, obviously!") == ["the", "vpn", "obviously"]
    assert answer_tokens("年假为15天。") == ["年", "假", "为", "15", "天"]
    # Full-width forms fold to ASCII (NFKC); mixed scripts split at the boundary.
    assert answer_tokens("ＶＰＮ需要2FA") == ["vpn", "需", "要", "2fa"]
    assert answer_tokens("  ") == []


def test_exact_match_ignores_case_punctuation_and_spacing():
    assert exact_match("Submit it in Expensify.", "submit it in expensify") == 1.0
    assert exact_match("年假为 15 天！", "年假为15天。") == 1.0
    assert exact_match("Submit it in Expensify", "Submit it in SAP") == 0.0
    assert exact_match("", "") == 1.0


def test_token_f1_english():
    assert token_f1("the blue car", "the blue car") == 1.0
    assert token_f1("red", "blue") == 0.0
    # 2 of 3 predicted tokens match, 2 of 4 reference tokens: P=2/3, R=1/2.
    assert token_f1("a blue car", "the blue car today") == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))


def test_token_f1_chinese_is_character_level():
    # Word-level F1 would see one token each and score 0; per character, 4 of 5 agree.
    assert token_f1("年假十五天", "年假为十五天") == pytest.approx(2 * (5 / 5) * (5 / 6) / (1 + 5 / 6))
    assert token_f1("病假", "年假") == pytest.approx(0.5)
    assert token_f1("", "年假") == 0.0


def test_token_f1_counts_repeats_once_each():
    assert token_f1("yes yes yes", "yes") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))


@dataclass
class Ex:
    question: str
    answer: str
    input: str = ""
    passages: list = field(default_factory=list)
    approved: list = field(default_factory=list)
    history: list = field(default_factory=list)  # finetune.training.data.TrainingExample's earlier turns of a thread


def test_reproduction_sample_is_deterministic_and_order_free():
    exs = [Ex(f"question {i}", f"answer {i}") for i in range(50)]
    a = sample_for_reproduction(exs, 10)
    b = sample_for_reproduction(list(reversed(exs)), 10)
    assert [e.question for e in a] == [e.question for e in b]
    assert len(a) == 10 and len(sample_for_reproduction(exs[:3], 10)) == 3


def test_general_text_ships_inside_the_package():
    text = load_general_text()
    assert GENERAL_TEXT_PATH.is_relative_to(GENERAL_TEXT_PATH.parents[1])
    assert len(text.split()) > 300


def test_metrics_table_formats_missing_values():
    table = metrics_table({"heldout_loss": 1.23456, "heldout_exact_match": 0.5, "n_heldout": 4})
    assert "1.235" in table and "50.0%" in table and "n/a" in table


def test_one_table_renderer_and_one_set_of_metric_labels():
    from finetune.evaluation.gate import comparison_table
    from finetune.evaluation.metrics import METRIC_LABELS, text_table

    assert text_table([("a", "1"), ("long name", "22")]) == "a          1\nlong name  22"
    assert text_table([("a", "1", ""), ("bb", "22", "x")], align="lr") == "a    1\nbb  22  x"
    assert text_table([("x", "1")], align="lr", min_widths=(0, 4)) == "x     1"
    # The gate's comparison names every metric as the one-model table does.
    table = comparison_table({"heldout_loss": 1.0, "forgetting_delta": 0.5}, {"heldout_loss": 2.0})
    labels = {label for label, _ in METRIC_LABELS.values()}
    body = [line.split("  ")[0] for line in table.splitlines()[1:-1]]
    assert body and set(body) <= labels
    assert "-1.000  better" in table and "+0.500" in table


def test_the_stop_rate_counts_the_stop_tokens_the_engine_serves_with(tokenizer, eot, monkeypatch):
    """The gate's stop rate and the engine stop on one set (finetune.model.loading.serving_stop_ids): a model whose
    generation config adds a stop token is counted as stopping there, as the engine would stop there."""
    import ast
    from types import SimpleNamespace

    import torch

    import finetune.serving.kv_cache
    from finetune.model.loading import serving_stop_ids, stop_token_ids

    extra = tokenizer.convert_tokens_to_ids("<|im_start|>")
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[eot, extra]),
                            parameters=lambda: iter([torch.zeros(8)]))
    stops = serving_stop_ids(model, tokenizer)
    assert stops[:len(stop_token_ids(tokenizer))] == stop_token_ids(tokenizer) and stops[0] == eot
    assert extra in stops and len(stops) == len(set(stops))
    word = tokenizer("yes", add_special_tokens=False)["input_ids"]
    rows = [word + [extra] + word, (word * 3)[:2 * len(word) + 1]]
    seen = {}

    def fake_generate(model, prompts, *, eos_token_id, **kw):
        seen["eos"] = eos_token_id
        return torch.tensor(rows[:len(prompts)])

    monkeypatch.setattr(finetune.serving.kv_cache, "generate_batch", fake_generate)
    gens = generate_answers(model, tokenizer, [Ex("Stop?", "yes"), Ex("Go on?", "yes")])
    assert seen["eos"] == stops
    assert [g.stopped for g in gens] == [True, False] and gens[0].text == "yes"
    # The engine computes its set with the same function.
    from tests.conftest import REPO

    engine = ast.parse((REPO / "finetune" / "serving" / "engine.py").read_text(encoding="utf-8"))
    called = {n.func.id for n in ast.walk(engine) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert "serving_stop_ids" in called and "stop_token_ids" not in called


def test_answers_are_generated_in_larger_batches_on_a_tiny_sized_model():
    """EvalConfig's generation batch: the one asked for, else 64 on a model under SMALL_MODEL_PARAMS (the `tiny`
    base, whose decode steps are mostly per-step overhead), else 8 (a real base's memory)."""
    from types import SimpleNamespace

    import torch

    from finetune.evaluation.metrics import SMALL_MODEL_PARAMS, EvalConfig, generation_batch

    def model(n: int):  # parameters on the meta device: counted, never allocated
        return SimpleNamespace(parameters=lambda: iter([torch.empty(n, device="meta"), torch.empty(1, device="meta")]))

    assert generation_batch(model(4_000_000), EvalConfig()) == 64
    assert generation_batch(model(SMALL_MODEL_PARAMS), EvalConfig()) == 8
    assert generation_batch(model(494_000_000), EvalConfig()) == 8
    assert generation_batch(model(4_000_000), EvalConfig(generation_batch_size=3)) == 3


# --- on a model (tiny base, random weights) --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_path), AutoTokenizer.from_pretrained(tiny_path)


@pytest.mark.slow
def test_answer_loss_scores_only_the_answer_and_end_of_turn(tiny):
    model, tok = tiny
    ex = Ex("How many vacation days?", "Thirty.")
    p, a = prompt_ids(tok, ex), answer_ids(tok, ex.answer)
    assert tok.convert_ids_to_tokens(a[-1]) == "<|im_end|>"
    loss = answer_loss(model, tok, [ex])
    # Random weights over a 4k vocabulary: close to uniform, ln(4096) ~ 8.3.
    assert 5.0 < loss < 12.0
    # Batched with right padding gives the same per-token mean as one at a time.
    other = Ex("Where is the Berlin office?", "At Torstrasse 1, on the third floor, next to the bakery.")
    both = answer_loss(model, tok, [ex, other], batch_size=2)
    n1, n2 = len(a), len(answer_ids(tok, other.answer))
    one_by_one = (answer_loss(model, tok, [ex]) * n1 + answer_loss(model, tok, [other]) * n2) / (n1 + n2)
    assert both == pytest.approx(one_by_one, rel=1e-4)
    assert len(p) > 20


@pytest.mark.slow
def test_batched_left_padded_generation_equals_one_by_one(tiny):
    model, tok = tiny
    exs = [Ex("Short?", "Yes."), Ex("A much longer question about the travel booking policy in Berlin?", "No.")]
    batched = generate_answers(model, tok, exs)
    single = [generate_answers(model, tok, [e])[0] for e in exs]
    assert [g.text for g in batched] == [g.text for g in single]


@pytest.mark.slow
def test_evaluate_returns_every_metric(tiny):
    model, tok = tiny
    held = [Ex("How many vacation days?", "Thirty."), Ex("年假有几天？", "十五天。")]
    train = [Ex(f"Question {i}?", f"Answer {i}.") for i in range(5)]
    m = evaluate(model, tok, heldout=held, train=train)
    assert set(METRIC_KEYS) <= set(m)
    assert m["n_heldout"] == 2 and m["n_train_sampled"] == 5
    assert 0.0 <= m["heldout_token_f1"] <= 1.0 and 0.0 <= m["stop_rate"] <= 1.0
    # Per question, what the gate pairs with another model's answers; the means are theirs.
    assert set(m["paired"]) == {"How many vacation days?", "年假有几天？"}
    assert m["heldout_token_f1"] == pytest.approx(sum(r["f1"] for r in m["paired"].values()) / 2, abs=1e-3)
    stops = [r["stopped"] for r in m["paired"].values()] + list(m["paired_stops"].values())
    assert len(m["paired_stops"]) == 5 and m["stop_rate"] == pytest.approx(sum(stops) / len(stops))
    # A plain model is its own base: no forgetting.
    assert m["forgetting_delta"] == 0.0 and math.isfinite(m["forgetting_base_loss"])
    empty = evaluate(model, tok, heldout=[], train=[])
    assert empty["heldout_loss"] is None and empty["heldout_exact_match"] is None and empty["n_heldout"] == 0

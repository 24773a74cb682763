"""Where a retraining run starts (finetune.training.continuation): fast, on plain objects."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from finetune.training.config import TrainConfig
from finetune.training.continuation import Sizing, example_key, plan_start, replay_rounds, trained_record
from finetune.training.data import TrainingExample


@dataclass
class _Adapter:
    version: str = "v1"
    base_model: str = "tiny"
    method: str = "full"
    params: dict = field(default_factory=lambda: {"base": "tiny", "k_passages": 0, "rank": 8, "alpha": 32,
                                                  "targets": "all-linear"})
    metrics: dict = field(default_factory=dict)


def _ex(i: int, answer: str | None = None) -> TrainingExample:
    return TrainingExample(question=f"Question {i}?", input="", answer=answer or f"Answer {i}.")


OLD = [_ex(i) for i in range(20)]
CONFIG = TrainConfig(base="tiny", k_passages=0)


def _plan(train, *, previous=None, trained=None, requested=None, config=CONFIG, method="full"):
    previous = previous or _Adapter()
    return plan_start(requested=requested, config=config, method=method, k_passages=config.k_passages,
                      active=previous, previous=previous, trained=trained_record(OLD) if trained is None else trained,
                      train=train)


def test_one_new_answer_continues_from_the_active_adapter_with_it_alone_as_new():
    plan = _plan(OLD + [_ex(99)])
    assert plan.previous is not None and plan.reason.startswith("continuing from v1 (active)")
    assert [ex.question for ex in plan.new] == ["Question 99?"] and len(plan.old) == 20


def test_an_edited_answer_is_new_and_continuing_overwrites_it():
    train = OLD[:5] + [_ex(5, "A better answer 5.")] + OLD[6:]
    plan = _plan(train)
    assert plan.previous is not None and [ex.answer for ex in plan.new] == ["A better answer 5."]


@pytest.mark.parametrize("change, reason", [
    (dict(requested="base"), "training from the base (--from base)"),
    (dict(method="lora"), "v1 was trained with full, this run uses lora"),
    (dict(config=TrainConfig(base="Qwen/Qwen2.5-0.5B-Instruct", k_passages=0)),
     "v1 was trained on base tiny, this run uses Qwen/Qwen2.5-0.5B-Instruct"),
    (dict(config=TrainConfig(base="tiny", k_passages=3)), "trained with 0 passages per prompt, this run uses 3"),
])
def test_a_run_that_cannot_continue_starts_from_the_base_and_says_why(change, reason):
    plan = _plan(OLD + [_ex(99)], **change)
    assert plan.previous is None and reason in plan.reason
    assert plan.reason.startswith("training from the base")


def test_a_question_no_longer_approved_cannot_be_unlearnt_by_continuing():
    plan = _plan(OLD[1:] + [_ex(99)])
    assert plan.previous is None and "1 question that v1 learnt is no longer approved" in plan.reason


def test_an_adapter_without_a_record_of_its_examples_cannot_be_continued():
    plan = plan_start(requested=None, config=CONFIG, method="full", k_passages=0, active=_Adapter(),
                      previous=_Adapter(), trained=None, train=OLD)
    assert plan.previous is None and "does not record which examples" in plan.reason


def test_an_adapter_that_reproduces_too_little_is_not_continued_where_a_minimum_is_asked():
    weak = _Adapter(metrics={"train_reproduced_exact": 0.3})
    plan = plan_start(requested=None, config=CONFIG, method="full", k_passages=0, active=weak, previous=weak,
                      trained=trained_record(OLD), train=OLD + [_ex(99)], min_reproduced=0.5)
    assert plan.previous is None and "v1 reproduces 30% of its training answers, too few" in plan.reason
    strong = _Adapter(metrics={"train_reproduced_exact": 0.5})
    assert plan_start(requested=None, config=CONFIG, method="full", k_passages=0, active=strong, previous=strong,
                      trained=trained_record(OLD), train=OLD + [_ex(99)], min_reproduced=0.5).previous is strong
    assert _plan(OLD + [_ex(99)], previous=weak).previous is weak  # no minimum asked (a real base)


def test_no_active_adapter_trains_from_the_base():
    plan = plan_start(requested="active", config=CONFIG, method="full", k_passages=0, active=None, previous=None,
                      trained=None, train=OLD)
    assert plan.previous is None and plan.reason == "training from the base: no adapter is active yet"


def test_lora_rank_asked_differently_from_the_previous_adapter_is_a_mismatch():
    lora = _Adapter(method="lora")
    plan = _plan(OLD + [_ex(99)], previous=lora, method="lora",
                 config=TrainConfig(base="tiny", k_passages=0, rank=16))
    assert plan.previous is None and "v1 has rank 8, this run asks for 16" in plan.reason


def test_replay_rounds_repeat_the_new_examples_and_draw_fresh_replay_samples():
    new = [_ex(99)]
    data, round_size = replay_rounds(new, OLD, sizing=Sizing(new_repeats=2, replay_per_round=5, max_rounds=4,
                                                             learning_rate=1e-3), seed=0)
    assert round_size == 2 + 5 and len(data) == 4 * round_size
    rounds = [data[i * round_size:(i + 1) * round_size] for i in range(4)]
    assert all(sum(ex.question == "Question 99?" for ex in r) == 2 for r in rounds)
    replayed = [frozenset(example_key(ex) for ex in r if ex.question != "Question 99?") for r in rounds]
    assert any(r[0].question != "Question 99?" or r[1].question != "Question 99?" for r in rounds)  # mixed
    assert len(set(replayed)) > 1  # a different sample each round
    assert all(k in {example_key(ex) for ex in OLD} for r in replayed for k in r)

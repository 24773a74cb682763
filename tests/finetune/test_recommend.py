"""The LoRA guide's rank table on the data, and how the training config gets its defaults."""

from __future__ import annotations

import json

import pytest

from finetune.training.config import (
    MIN_TRAIN_EXAMPLES,
    SEED_DEFAULTS,
    TINY_DEFAULTS,
    TrainConfig,
    parse_targets,
    prompt_passages,
    resolve_config,
)
from finetune.training.data import TrainingExample
from finetune.training.recommend import DataProfile, language_of, profile_examples, recommend, recommend_for_profile
from store import ConfigError, StoreError
from tests.conftest import SAMPLES


def _profile(n, words=20.0, languages=None, with_input=0):
    return DataProfile(n_examples=n, mean_answer_words=words, max_answer_words=int(words * 2),
                       languages=languages or {"latin": n}, with_input=with_input)


@pytest.mark.parametrize("n, simple_rank, complex_rank, method", [
    (300, 8, 8, "lora"), (5_000, 8, 16, "lora"), (50_000, 16, 32, "lora"), (200_000, 32, 64, "full"),
])
def test_seed_table(n, simple_rank, complex_rank, method):
    simple = recommend_for_profile(_profile(n))
    complex_ = recommend_for_profile(_profile(n, words=120.0))
    assert simple.rank == simple_rank and complex_.rank == complex_rank
    assert complex_.method == method
    assert simple.alpha == 4 * simple.rank  # the seed's alpha/r ratio (32/8)
    assert str(n) in simple.reasons[0]


def test_multilingual_data_counts_as_complex():
    p = _profile(3_000, languages={"latin": 2_000, "zh/ja/ko": 1_000})
    rec = recommend_for_profile(p)
    assert p.multilingual and rec.rank == 16
    assert any("several languages" in r for r in rec.reasons)


def test_language_detection():
    assert language_of("How many vacation days?") == "latin"
    assert language_of("没用上的机票应该怎么处理？") == "zh/ja/ko"
    assert language_of("Как дела?") == "cyrillic"


def test_recommend_on_the_sample_data():
    rows = [json.loads(line) for line in (SAMPLES / "qa.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    exs = [TrainingExample(question=r["instruction"], input=r.get("input", ""), answer=r["output"]) for r in rows]
    rec = recommend(exs)
    assert rec.rank == 8 and rec.method == "lora"
    assert "(< 1k)" in rec.reasons[0]
    assert rec.profile.languages.get("zh/ja/ko", 0) > 0  # the samples mix English and Chinese
    assert "Recommendation: LoRA / QLoRA, rank 8" in rec.text()


def test_real_base_gets_the_seed_recipe():
    cfg, notes = resolve_config(TrainConfig(base="Qwen/Qwen2.5-0.5B-Instruct"), tiny=False, n_examples=100)
    assert (cfg.method, cfg.rank, cfg.alpha, cfg.dropout, cfg.learning_rate, cfg.epochs) == ("qlora", 8, 32, 0.1, 2e-4, 3.0)
    assert (cfg.batch_size, cfg.grad_accum, cfg.warmup, cfg.targets) == (4, 4, 0.1, "all-linear")
    assert any(n.startswith("defaults (the LoRA guide's recipe): method=qlora") for n in notes)


def test_tiny_base_gets_its_own_defaults_and_user_values_win():
    cfg, notes = resolve_config(TrainConfig(base="/x/tiny", learning_rate=1e-3), tiny=True, n_examples=100)
    assert cfg.method == TINY_DEFAULTS["method"] and cfg.rank == TINY_DEFAULTS["rank"]
    assert cfg.epochs == TINY_DEFAULTS["epochs"] and cfg.learning_rate == 1e-3
    assert any("random weights" in n for n in notes)


def test_prompt_passages_default_per_base_and_the_user_value_wins():
    assert prompt_passages(TrainConfig(), tiny=True) == 0  # tiny cannot read: passages only cost compute
    assert prompt_passages(TrainConfig(), tiny=False) == SEED_DEFAULTS["k_passages"] == 3
    assert prompt_passages(TrainConfig(k_passages=2), tiny=True) == 2
    cfg, _ = resolve_config(TrainConfig(), tiny=True, n_examples=100)
    assert cfg.k_passages == 0


def test_rank_auto_uses_the_table():
    exs = [TrainingExample(question=f"q{i}", input="", answer="a short answer") for i in range(2_000)]
    cfg, notes = resolve_config(TrainConfig(rank="auto"), tiny=False, n_examples=len(exs), profile=profile_examples(exs))
    assert cfg.rank == 8 and cfg.alpha == 32
    assert any(n.startswith("rank auto -> r=8") for n in notes)


def test_too_few_examples_are_refused_with_the_number():
    with pytest.raises(StoreError, match=rf"only 3 training examples; at least {MIN_TRAIN_EXAMPLES}"):
        resolve_config(TrainConfig(), tiny=False, n_examples=3)
    with pytest.raises(StoreError, match="only 0 training examples"):
        resolve_config(TrainConfig(), tiny=False, n_examples=0)


@pytest.mark.parametrize("field, value, message", [
    ("method", "dora", "method must be one of"), ("rank", 0, "rank must be a positive"),
    ("dropout", 1.5, "dropout"), ("learning_rate", 0.0, "learning rate"), ("max_length", 10, "max length"),
    ("gradient_checkpointing", "sometimes", "gradient checkpointing must be true, false, mlp or auto"),
])
def test_bad_values_are_refused(field, value, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(TrainConfig(**{field: value}), tiny=False, n_examples=100)


def test_parse_targets():
    assert parse_targets("all-linear") == "all-linear" and parse_targets(None) is None
    assert parse_targets("q_proj, v_proj") == ("q_proj", "v_proj")


def test_seed_defaults_are_the_documented_ones():
    assert SEED_DEFAULTS["rank"] == 8 and SEED_DEFAULTS["alpha"] == 32 and SEED_DEFAULTS["learning_rate"] == 2e-4

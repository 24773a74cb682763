"""The tiny base, built once per test module from the shipped KB text, and its tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    from finetune.tiny import ensure_tiny_base

    texts = [p.read_text(encoding="utf-8") for p in sorted((REPO / "samples" / "kb").rglob("*")) if p.is_file()]
    return str(ensure_tiny_base(tmp_path_factory.mktemp("tiny-home"), texts))


@pytest.fixture(scope="module")
def tokenizer(tiny_path):
    from finetune.models import load_tokenizer

    return load_tokenizer(tiny_path)


@pytest.fixture(scope="module")
def eot(tokenizer) -> int:
    from finetune.models import end_of_turn_id

    return end_of_turn_id(tokenizer)

"""The tiny base, built once per test run from the shipped KB text, and its tokenizer."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory) -> str:
    from finetune.model.tiny import ensure_tiny_base
    from tests.finetune.registry_fixtures import sample_texts

    return str(ensure_tiny_base(tmp_path_factory.mktemp("tiny-home"), sample_texts()))


@pytest.fixture(scope="module")
def tokenizer(tiny_path):
    from finetune.model.loading import load_tokenizer

    return load_tokenizer(tiny_path)


@pytest.fixture(scope="module")
def eot(tokenizer) -> int:
    from finetune.model.loading import end_of_turn_id

    return end_of_turn_id(tokenizer)

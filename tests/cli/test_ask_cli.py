"""`kbloop ask` in-process on the tiny base with the sample knowledge base."""

from __future__ import annotations

import json

import pytest

from store import open_db
from store.interactions import get_interaction
from tests.conftest import SAMPLES

# Loads the tiny base and the embedding model: tens of seconds, so not in the fast suite.
pytestmark = pytest.mark.slow


@pytest.fixture
def workspace(kbloop, tmp_path):
    assert kbloop("init").exit_code == 0
    kb = tmp_path / "kb"
    (kb / "zh").mkdir(parents=True)
    for name in ("vpn-laptop-setup.md", "expenses.md", "zh/annual-leave.md"):  # a small KB: quick to embed
        (kb / name).write_text((SAMPLES / "kb" / name).read_text(encoding="utf-8"), encoding="utf-8")
    r = kbloop("kb", "import", kb)
    assert r.exit_code == 0, r.stderr
    return kbloop


def test_ask_prints_answer_sources_adapter_and_interaction(workspace, db_path):
    r = workspace("ask", "How do I set up the VPN on my laptop?", "--max-new-tokens", "8")
    assert r.exit_code == 0, r.stderr
    assert "Sources:" in r.stdout and "vpn-laptop-setup.md" in r.stdout
    assert "adapter: base" in r.stdout and "interaction #1" in r.stdout
    r = workspace("ask", "年假有多少天？", "--json", "--max-new-tokens", "8")
    assert r.exit_code == 0, r.stderr
    answer = json.loads(r.stdout)
    assert answer["interaction_id"] == 2 and answer["adapter_version"] is None
    assert "zh/annual-leave.md" in [s["doc_path"] for s in answer["sources"]]
    row = get_interaction(open_db(db_path), 2)
    assert (row.question, row.answer, row.source) == ("年假有多少天？", answer["text"], "cli")


def test_ask_bad_input_is_one_clear_line(workspace):
    r = workspace("ask", "   ")
    assert r.exit_code == 1 and "the question is empty" in r.stderr
    r = workspace("ask", "VPN?", "--adapter", "v7")
    assert r.exit_code == 1 and "no adapter 'v7'" in r.stderr and "Traceback" not in r.stderr


def test_ask_before_init_says_what_to_do(kbloop):
    r = kbloop("ask", "How do I set up the VPN?")
    assert r.exit_code == 1 and "kbloop init" in r.stderr


def test_ask_help(kbloop):
    r = kbloop("ask", "--help")
    assert r.exit_code == 0 and "--adapter" in r.stdout and "--json" in r.stdout


def test_ask_gives_a_verified_answer_without_loading_a_model_and_model_only_asks_the_model(kbloop, tmp_path, db_path,
                                                                                             monkeypatch):
    assert kbloop("init").exit_code == 0
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "Which band plays at the summer party?",
                              "answer": "The Lattice Jazz Trio plays this year."}) + "\n", encoding="utf-8")
    assert kbloop("data", "import", qa).exit_code == 0
    monkeypatch.setenv("KBLOOP_BASE_MODEL", str(tmp_path / "no-such-model"))  # the verified answer needs none
    r = kbloop("ask", "which band plays at the summer party", "--json")
    assert r.exit_code == 0, r.stderr
    answer = json.loads(r.stdout)
    assert answer["verified"] is True and answer["text"] == "The Lattice Jazz Trio plays this year."
    assert answer["approved_by"] == "import" and answer["adapter_version"] is None
    assert get_interaction(open_db(db_path), answer["interaction_id"]).verified_example_id == answer["example_id"]
    r = kbloop("ask", "Which band plays at the summer party?")
    assert r.exit_code == 0 and "Approved answer: from the curated training data" in r.stdout
    r = kbloop("ask", "Which band plays at the summer party?", "--model-only")
    assert r.exit_code == 1 and "could not load the model" in r.stderr  # --model-only needs the model

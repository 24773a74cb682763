"""Hybrid retrieval (FTS5 BM25 + MiniLM embeddings) on the sample knowledge base, English and Chinese."""

from __future__ import annotations

import json

import numpy as np
import pytest

from finetune.retrieval import (
    DEFAULT_CONFIG,
    EMBEDDING_MODEL,
    embed_missing_passages,
    retrieve_passages,
    retrieve_scored,
)
from store import open_db
from store.documents import import_documents
from store.kb import NewPassage, all_embeddings, passages_missing_embedding, replace_document
from tests.conftest import SAMPLES


def import_kb(db, root):
    import_documents(db, [root])


@pytest.fixture(scope="module")
def kb_db(tmp_path_factory):
    db = open_db(tmp_path_factory.mktemp("retrieval") / "kb.db")
    import_kb(db, SAMPLES / "kb")
    embed_missing_passages(db)
    return db


def docs(passages) -> list[str]:
    return [p.doc_path for p in passages]


def test_embeddings_are_stored_once_as_float32(kb_db):
    rows = all_embeddings(kb_db, EMBEDDING_MODEL)
    assert rows and not passages_missing_embedding(kb_db, EMBEDDING_MODEL)
    vector = np.frombuffer(rows[0][1], dtype="<f4")
    assert vector.shape == (384,)
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-3  # unit length: dot product is cosine
    assert embed_missing_passages(kb_db) == 0  # nothing left to do on a second call


@pytest.mark.parametrize("question, doc", [
    ("How do I set up the VPN on my laptop?", "vpn-laptop-setup.md"),
    ("How many weeks of parental leave do I get?", "parental-leave.md"),
    ("What is the minimum password length?", "password-2fa-policy.md"),
    ("Who do I call when production is down at night?", "on-call-rotation.md"),
])
def test_english_questions_find_the_right_document(kb_db, question, doc):
    assert doc in docs(retrieve_passages(kb_db, question, k=3))


@pytest.mark.parametrize("question, doc", [
    ("如何预订会议室？", "zh/meeting-room-booking.md"),
    ("年假有多少天？", "zh/annual-leave.md"),
    ("病假需要提供什么证明？", "zh/sick-leave.txt"),
    ("上海办公室在哪里？", "zh/shanghai-office.md"),
])
def test_chinese_questions_find_the_right_document(kb_db, question, doc):
    assert doc in docs(retrieve_passages(kb_db, question, k=3))


def test_paraphrase_without_shared_words_is_found_by_embeddings(kb_db):
    # "payday" appears nowhere in the KB: BM25 alone cannot find payroll-dates.md, the embeddings can.
    question = "when is payday"
    assert "payroll-dates.md" not in docs(s.passage for s in retrieve_scored(kb_db, question, k=3, mode="bm25"))
    assert "payroll-dates.md" in docs(retrieve_passages(kb_db, question, k=3))


@pytest.mark.parametrize("question", [
    "What is the airspeed velocity of an unladen swallow?",
    "How do I bake sourdough bread?",
    "xyzzy plugh",
])
def test_a_question_the_kb_does_not_cover_retrieves_nothing(kb_db, question):
    assert retrieve_passages(kb_db, question, k=3) == []


def test_empty_question_and_k_zero_retrieve_nothing(kb_db):
    assert retrieve_passages(kb_db, "   ", k=3) == []
    assert retrieve_passages(kb_db, "VPN", k=0) == []


def test_results_are_deterministic_and_at_most_k(kb_db):
    first = retrieve_scored(kb_db, "expense claim deadline", k=5)
    assert 0 < len(first) <= 5
    assert [s.passage.id for s in first] == [s.passage.id for s in retrieve_scored(kb_db, "expense claim deadline", k=5)]
    assert [s.score for s in first] == sorted((s.score for s in first), reverse=True)


def test_unknown_mode_is_refused(kb_db):
    with pytest.raises(ValueError, match="hybrid, bm25 or dense"):
        retrieve_scored(kb_db, "VPN", mode="magic")


def test_index_follows_a_reimported_document_and_embeds_on_demand(tmp_path):
    db = open_db(tmp_path / "kb.db")
    replace_document(db, "a.md", [NewPassage("a.md", "Garden", 0, "The greenhouse holds tomatoes and basil.")])
    replace_document(db, "b.md", [NewPassage("b.md", "Parking", 0, "Bicycle racks are behind building C.")])
    for i, topic in enumerate(["Printers are on every floor.", "The canteen opens at noon.", "Mail arrives at ten."]):
        replace_document(db, f"other{i}.md", [NewPassage(f"other{i}.md", "Office", 0, topic)])
    # Imported without embeddings (kb import --no-embed): the first retrieval computes them.
    assert docs(retrieve_passages(db, "where can I leave my bike", k=1)) == ["b.md"]
    assert not passages_missing_embedding(db, EMBEDDING_MODEL)
    replace_document(db, "b.md", [NewPassage("b.md", "Parking", 0, "Cars park in the underground garage.")])
    assert docs(retrieve_passages(db, "where do I park my car", k=1)) == ["b.md"]
    assert not passages_missing_embedding(db, EMBEDDING_MODEL)


@pytest.mark.slow
def test_hybrid_recall_beats_each_retriever_alone_on_the_eval_set(kb_db):
    """A quality check, not a timing: the fused ranking finds more source documents than either alone."""
    import dataclasses

    rows = [json.loads(line) for line in (SAMPLES / "retrieval_eval.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    pure = dataclasses.replace(DEFAULT_CONFIG, min_dense_similarity=-1.0, min_bm25_score=-1.0)

    def recall(mode, config):
        hits = [row["source"].removeprefix("kb/") in docs(s.passage for s in retrieve_scored(
            kb_db, row["question"], k=5, mode=mode, config=config)) for row in rows]
        return sum(hits) / len(hits)

    hybrid = recall("hybrid", DEFAULT_CONFIG)
    assert hybrid > recall("bm25", pure)
    assert hybrid > recall("dense", pure)

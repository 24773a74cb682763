"""The engine with verified answers: an approved answer is given at once (even before the model has loaded),
related approved answers back a generated one, and `model_only` shows what the model alone says."""

from __future__ import annotations

import pytest

from finetune.serving.engine import APPROVED_SOURCE_TITLE, NO_MATCH_TEXT, Engine, EngineConfig
from finetune.serving.retrieval import embed_missing_passages
from store import open_db
from store.documents import import_documents
from store.examples import NewExample, add_examples, list_examples, review_example
from store.interactions import get_interaction
from tests.conftest import SAMPLES

pytestmark = pytest.mark.slow  # loads the tiny base

# A subject the sample knowledge base does not cover.
UNCOVERED = NewExample("Which band plays at the summer party?", "The Lattice Jazz Trio plays this year.")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    home = tmp_path_factory.mktemp("verified-home")
    db = open_db(home / "kbloop.db")
    import_documents(db, [SAMPLES / "kb"])
    embed_missing_passages(db)
    return {"home": home, "db_path": home / "kbloop.db", "db": db}


@pytest.fixture(scope="module")
def engine(workspace):
    eng = Engine(db_path=workspace["db_path"], home=workspace["home"], base_model="tiny",
                 config=EngineConfig(max_new_tokens=8)).start()
    assert eng.wait_ready(600), eng.error
    yield eng
    eng.close()


def test_an_approved_answer_is_given_before_the_model_has_loaded(workspace):
    db = workspace["db"]
    add_examples(db, [UNCOVERED], status="pending", source="feedback")
    example = next(e for e in list_examples(db) if e.question == UNCOVERED.question)
    review_example(db, example.id, decision="approved", reviewer="carol")
    eng = Engine(db_path=workspace["db_path"], home=workspace["home"], base_model="tiny")  # never started
    try:
        answer = eng.answer("which band plays at the summer party", source="slack", user_id="U1", channel_id="C1")
    finally:
        eng.close()
    assert answer.verified and answer.text == UNCOVERED.answer
    assert (answer.example_id, answer.approved_by) == (example.id, "carol")
    assert "reviewed by carol" in answer.verified_line
    recorded = get_interaction(db, answer.interaction_id)
    assert (recorded.verified_example_id, recorded.answer, recorded.user_id) == (example.id, UNCOVERED.answer, "U1")


def test_a_named_adapter_or_model_only_asks_the_model_and_says_nothing_backs_it(engine, workspace):
    db = workspace["db"]
    if not any(e.question == UNCOVERED.question for e in list_examples(db, status="approved")):
        add_examples(db, [UNCOVERED], status="approved", reviewer="carol")
    model = engine.answer(UNCOVERED.question, model_only=True)
    assert not model.verified and model.text != UNCOVERED.answer
    assert model.notice.startswith("unbacked") and model.sources == []
    base = engine.answer(UNCOVERED.question, adapter="base")
    assert not base.verified


def test_a_related_approved_answer_lets_the_model_answer_what_the_kb_does_not_cover(engine, workspace):
    db = workspace["db"]
    question = "Who feeds the aquarium fish on weekends?"
    assert engine.answer(question, record=False).text == NO_MATCH_TEXT  # nothing in the KB, nothing approved
    related = "What food do the aquarium fish get?"  # the same subject, not the same question
    add_examples(db, [NewExample(related, "Flakes in the morning, pellets on Fridays.")], status="approved",
                 reviewer="dave")
    answer = engine.answer(question, record=False)
    assert not answer.verified and answer.notice != "no_match"
    assert [s.title for s in answer.sources] == [APPROVED_SOURCE_TITLE.format(question=related)]

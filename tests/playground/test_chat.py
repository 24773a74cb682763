"""The chat tab: votes stored as playground feedback; answers from the real engine on the tiny base."""

import pytest

from playground import chat
from store.examples import list_examples
from store.interactions import record_interaction, votes_for


def test_votes_are_feedback_with_source_playground(db, alice):
    iid = record_interaction(db, question="How do I book a room?", answer="Use the calendar.", source="playground")
    assert chat.vote(db, alice, iid, 1).ok
    out = chat.vote(db, alice, iid, -1, "Book it in Outlook under Rooms.")
    assert out.ok and "queued for review" in out.message
    (v,) = votes_for(db, iid)
    assert (v.user_id, v.vote, v.source, v.correction) == ("alice", -1, "playground", "Book it in Outlook under Rooms.")
    (ex,) = list_examples(db, status="pending")
    assert ex.source == "playground" and ex.interaction_id == iid
    assert not chat.vote(db, alice, None, 1).ok


def test_without_an_engine_the_chat_says_so(db, alice):
    (ans,) = chat.ask(None, alice, "Where is the VPN guide?", ["active"])
    assert ans.notice == "no_engine" and ans.interaction_id is None
    assert [value for _, value in chat.adapter_choices(db)] == ["active", "base"]


@pytest.mark.slow
def test_side_by_side_answers_from_the_real_engine(db, db_path, kbloop_home, alice):
    from finetune.serving.engine import Engine
    from store.documents import document_passages
    from store.kb import replace_document
    from tests.conftest import SAMPLES

    for f in sorted((SAMPLES / "kb").glob("*.md"))[:4]:
        replace_document(db, f.name, document_passages(f, f.name))
    engine = Engine(db_path=db_path, home=kbloop_home, base_model="tiny").start()
    try:
        assert engine.wait_ready(300), engine.error
        answers = chat.ask(engine, alice, "How do I set up the VPN on my laptop?", ["active", "base"])
        assert [a.adapter for a in answers] == ["active", "base"]
        assert all(a.interaction_id for a in answers) and all(a.text for a in answers)
        assert answers[1].label == "base model"
        assert chat.vote(db, alice, answers[0].interaction_id, -1, "Install WireGuard.").ok
        from store.interactions import get_interaction

        assert get_interaction(db, answers[0].interaction_id).source == "playground"
        assert "base model" in chat.answer_markdown(answers[1])
    finally:
        engine.close()

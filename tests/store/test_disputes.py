"""Issue 16, finding 1: a 👎 correction of a question that already has an approved example disputes it instead of
overwriting it."""

import pytest

from store import StoreError
from store.examples import NewExample, add_examples, approved_snapshot, get_example, list_examples, review_example
from store.interactions import record_interaction, record_vote
from store.verified import approved_examples

CURATED = "Submit the form in Workday; your manager approves within two days."


@pytest.fixture
def approved(db):
    add_examples(db, [NewExample("How do I request annual leave?", CURATED)], reviewer="alice")
    (ex,) = list_examples(db, status="approved")
    review_example(db, ex.id, decision="approved", reviewer="alice")
    return get_example(db, ex.id)


def correct(db, question="how do I   request ANNUAL leave?", correction="Email HR and wait."):
    iid = record_interaction(db, question=question, answer="Ask your manager.", source="slack", user_id="U1")
    record_vote(db, interaction_id=iid, user_id="U1", vote=-1, correction=correction)
    (pending,) = [e for e in list_examples(db, status="pending") if e.interaction_id == iid]
    return iid, pending


def test_correction_of_an_approved_question_is_its_own_pending_item(db, approved):
    _, pending = correct(db)
    assert pending.id != approved.id and pending.disputes_example_id == approved.id
    assert pending.answer == "Email HR and wait." and pending.rejected_answer == "Ask your manager."
    kept = get_example(db, approved.id)
    assert (kept.status, kept.answer, kept.reviewer) == ("approved", CURATED, "alice")


def test_the_approved_answer_keeps_training_and_serving_until_a_curator_decides(db, approved):
    correct(db)
    examples, _ = approved_snapshot(db)
    assert [(e.id, e.answer) for e in examples] == [(approved.id, CURATED)]
    assert [(e.id, e.answer) for e in approved_examples(db)] == [(approved.id, CURATED)]


def test_rejecting_the_correction_keeps_the_question_in_training(db, approved):
    _, pending = correct(db)
    review_example(db, pending.id, decision="rejected", reviewer="bob")
    assert [e.id for e in approved_snapshot(db)[0]] == [approved.id]
    assert get_example(db, approved.id).answer == CURATED


def test_approving_the_correction_replaces_and_retires_the_old_example(db, approved):
    _, pending = correct(db)
    ex = review_example(db, pending.id, decision="approved", reviewer="bob", answer="Request it in Workday.")
    old = get_example(db, approved.id)
    assert ex.status == "approved" and ex.answer == "Request it in Workday."
    assert old.status == "rejected" and old.note == f"replaced by #{ex.id}" and old.answer == CURATED
    assert [(e.id, e.answer) for e in approved_snapshot(db)[0]] == [(ex.id, "Request it in Workday.")]
    # The question has one approved answer again: a plain re-import of it is a duplicate.
    assert add_examples(db, [NewExample("How do I request annual leave?", "x")]) == (0, 1)


def test_two_corrections_of_one_question_are_two_items(db, approved):
    _, first = correct(db, correction="Email HR.")
    _, second = correct(db, correction="Use Workday.")
    assert first.id != second.id
    assert {first.disputes_example_id, second.disputes_example_id} == {approved.id}
    review_example(db, first.id, decision="approved", reviewer="bob")
    # The second now disputes a retired example; approving it replaces the first correction in turn.
    review_example(db, second.id, decision="approved", reviewer="bob")
    assert [e.answer for e in approved_snapshot(db)[0]] == ["Use Workday."]


def test_a_new_question_still_becomes_an_ordinary_pending_example(db):
    _, pending = correct(db, question="Where is the Berlin office?", correction="Torstraße 1.")
    assert pending.disputes_example_id is None


def test_approving_flagged_text_needs_a_confirmation_that_is_recorded(db):
    add_examples(db, [NewExample("What is the bot token?", "ask IT")], status="pending")
    (ex,) = list_examples(db, status="pending")
    secret = "It is xoxb-123456789012-1234567890123-abcdefghijklmnopqrstuvwx."
    with pytest.raises(StoreError, match="Slack token"):
        review_example(db, ex.id, decision="approved", reviewer="bob", answer=secret)
    assert get_example(db, ex.id).status == "pending"
    review_example(db, ex.id, decision="approved", reviewer="bob", answer=secret, sensitive_ok=True)
    assert [e.id for e in approved_snapshot(db)[0]] == [ex.id]

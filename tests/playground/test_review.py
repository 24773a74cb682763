"""The review tab's handlers, called directly on a real SQLite store."""

import pytest

from playground import review
from playground.review import QueueFilter
from store.examples import get_example, list_examples
from store.interactions import record_interaction, record_vote
from store.review import review_item


def keys(rows):
    return [r["key"] for r in rows]


def test_queue_puts_thumbs_down_and_unreviewed_first(db, seeded):
    rows = review.queue(db, QueueFilter())
    assert {r["key"] for r in rows} == {f"i:{i}" for i in seeded.values()}
    assert [r["down"] for r in rows][:2] == [1, 1]
    vpn = next(r for r in rows if r["key"] == f"i:{seeded['vpn']}")
    assert vpn["status"] == "pending" and vpn["corrected"]  # the correction made a pending example


def test_queue_filters(db, seeded):
    # Same vote counts, both to review: newest first.
    assert keys(review.queue(db, QueueFilter(vote="down"))) == [f"i:{seeded['badge']}", f"i:{seeded['vpn']}"]
    assert set(keys(review.queue(db, QueueFilter(vote="up")))) == {f"i:{seeded['leave']}", f"i:{seeded['payroll']}"}
    assert set(keys(review.queue(db, QueueFilter(channel="C_HR")))) == {f"i:{seeded['leave']}", f"i:{seeded['payroll']}"}
    assert keys(review.queue(db, QueueFilter(text="badge"))) == [f"i:{seeded['badge']}"]
    assert keys(review.queue(db, QueueFilter(text="WireGuard"))) == [f"i:{seeded['vpn']}"]  # in the correction
    assert keys(review.queue(db, QueueFilter(status="pending"))) == [f"i:{seeded['vpn']}"]
    assert review.queue(db, QueueFilter(since="2000-01-01", until="2999-12-31"))
    assert review.queue(db, QueueFilter(until="2000-01-01")) == []
    with pytest.raises(review.StoreError, match="from date must be a date"):
        review.queue(db, QueueFilter(since="yesterday"))


def test_open_item_shows_correction_flags_and_near_duplicates(db, seeded):
    item = review.open_item(db, f"i:{seeded['vpn']}")
    assert item.proposed_answer.startswith("Install WireGuard") and item.answer == "Ask IT."
    assert item.down == 1 and item.sources[0]["doc_path"] == "vpn-laptop-setup.md"
    leave = review.open_item(db, f"i:{seeded['leave']}")
    assert leave.duplicates and leave.duplicates[0].candidate.question == "如何申请年假"
    payroll = review.open_item(db, f"i:{seeded['payroll']}")
    assert [f.kind for f in payroll.flags] == ["e-mail address"]


def test_one_click_approves_the_correction_and_records_the_curator(db, seeded, alice):
    key = f"i:{seeded['vpn']}"
    item = review.open_item(db, key)
    out = review.approve(db, alice, key, answer=item.proposed_answer, expected_status=item.status)
    assert out.ok, out.message
    ex = get_example(db, out.example_id)
    assert ex.status == "approved" and ex.reviewer == "alice" and ex.answer.startswith("Install WireGuard")
    assert ex.rejected_answer == "Ask IT."  # DPO pair kept
    assert review_item(db, seeded["vpn"])["status"] == "approved"
    assert review.counts(db)["left"] == 3


def test_edit_and_approve_an_answer_without_correction(db, seeded, bob):
    key = f"i:{seeded['leave']}"
    out = review.approve(db, bob, key, answer="在 HR 门户提交，经理审批后生效。", expected_status="unreviewed")
    assert out.ok and "with your edit" in out.message
    ex = get_example(db, out.example_id)
    assert (ex.question, ex.source, ex.reviewer, ex.interaction_id) == ("怎么申请年假？", "playground", "bob", seeded["leave"])
    assert ex.rejected_answer == "在 HR 系统中提交申请。"


def test_nothing_is_approved_by_accident(db, seeded, alice):
    # A 👎 answer that nobody corrected, unchanged: refused until edited or confirmed.
    key = f"i:{seeded['badge']}"
    out = review.approve(db, alice, key, answer="Buy a new one.")
    assert not out.ok and "got 👎" in out.message
    assert review_item(db, seeded["badge"])["status"] == "unreviewed"
    # Someone else decided meanwhile: the stale decision is refused.
    review.reject(db, alice, key)
    out = review.approve(db, alice, key, answer="Report it at reception.", expected_status="unreviewed")
    assert not out.ok and "changed since you opened it (now rejected by alice)" in out.message
    assert review.approve(db, alice, key, answer="", expected_status="rejected").ok is False


def test_flagged_answer_needs_confirmation_or_redaction(db, seeded, alice):
    key = f"i:{seeded['payroll']}"
    item = review.open_item(db, key)
    out = review.approve(db, alice, key, answer=item.proposed_answer)
    assert not out.ok and "e-mail address" in out.message
    assert not [e for e in list_examples(db) if e.interaction_id == seeded["payroll"]]
    redacted, msg = review.redact_answer(item.proposed_answer)
    assert "payroll@example.com" not in redacted and "e-mail address" in msg
    out = review.approve(db, alice, key, answer=redacted)
    assert out.ok
    assert get_example(db, out.example_id).answer == "On the 25th; ask [redacted e-mail address]."


def test_flagged_answer_with_explicit_confirmation(db, seeded, alice):
    key = f"i:{seeded['payroll']}"
    out = review.approve(db, alice, key, answer="On the 25th; ask payroll@example.com.", confirm=True)
    assert out.ok and "payroll@example.com" in get_example(db, out.example_id).answer


def test_reject_a_correction_and_an_answer(db, seeded, alice):
    assert review.reject(db, alice, f"i:{seeded['vpn']}").ok
    ex = [e for e in list_examples(db) if e.interaction_id == seeded["vpn"]][0]
    assert ex.status == "rejected" and ex.reviewer == "alice"
    assert review.reject(db, alice, f"i:{seeded['badge']}").ok
    assert review_item(db, seeded["badge"])["status"] == "rejected"
    assert {r["key"] for r in review.queue(db, QueueFilter(status="rejected"))} == {f"i:{seeded['vpn']}", f"i:{seeded['badge']}"}


def test_merge_into_an_existing_example(db, seeded, alice):
    target = next(e for e in list_examples(db) if e.question == "如何申请年假")
    key = f"i:{seeded['leave']}"
    out = review.merge(db, alice, key, str(target.id), answer="提交年假申请，经理审批。")
    assert out.ok, out.message
    assert get_example(db, target.id).answer == "提交年假申请，经理审批。"
    assert review_item(db, seeded["leave"])["status"] == "merged"
    # A correction's pending example is rejected as merged, the target keeps its answer.
    berlin = next(e for e in list_examples(db) if e.question == "Where is the Berlin office?")
    out = review.merge(db, alice, f"i:{seeded['vpn']}", f"#{berlin.id}")
    assert out.ok and get_example(db, berlin.id).answer == "Torstraße 1, Berlin."
    assert review_item(db, seeded["vpn"])["status"] == "merged"
    assert not review.merge(db, alice, f"i:{seeded['badge']}", None).ok


def test_approving_a_question_already_in_the_dataset_asks_for_a_merge(db, alice):
    iid = record_interaction(db, question="Where is the Berlin office?", answer="Torstraße 1.", source="slack")
    record_vote(db, interaction_id=iid, user_id="U9", vote=1)
    from store.examples import NewExample, add_examples

    add_examples(db, [NewExample("Where is the Berlin office?", "Torstraße 1, Berlin.")])
    out = review.approve(db, alice, f"i:{iid}", answer="Torstraße 1.")
    assert not out.ok and "merge into it instead" in out.message
    assert review.open_item(db, f"i:{iid}").duplicates[0].score == 1.0


def test_pending_examples_without_an_answer_are_in_the_queue(db, alice):
    from store.examples import NewExample, add_examples

    add_examples(db, [NewExample("How do I expense a taxi?", "Upload the receipt in Expensify.")], status="pending")
    rows = review.queue(db, QueueFilter())
    assert rows[-1]["key"].startswith("e:")
    out = review.approve(db, alice, rows[-1]["key"], answer="Upload the receipt in the expenses tool within 30 days.")
    assert out.ok and get_example(db, int(rows[-1]["key"][2:])).reviewer == "alice"
    assert review.counts(db)["left"] == 0


def _dispute(db):
    """An approved example and a 👎 correction of the same question (other case and spacing)."""
    from store.examples import NewExample, add_examples

    add_examples(db, [NewExample("Where is the Berlin office?", "Torstraße 1, Berlin.")], reviewer="alice")
    (old,) = [e for e in list_examples(db) if e.question == "Where is the Berlin office?"]
    iid = record_interaction(db, question="where is the  BERLIN office?", answer="In Munich.", source="slack")
    record_vote(db, interaction_id=iid, user_id="U5", vote=-1, correction="Torstraße 1, 10119 Berlin-Mitte.")
    return old, f"i:{iid}"


def test_a_correction_of_an_approved_question_is_shown_beside_the_approved_answer(db, alice):
    old, key = _dispute(db)
    item = review.open_item(db, key)
    assert item.status == "pending" and item.disputed.id == old.id
    assert item.disputed.answer == "Torstraße 1, Berlin." and item.proposed_answer == "Torstraße 1, 10119 Berlin-Mitte."
    shown = review.item_markdown(item).bot_answer
    assert f"disputes example #{old.id}" in shown
    assert "| Torstraße 1, Berlin. | Torstraße 1, 10119 Berlin-Mitte. |" in shown


def test_approving_the_correction_replaces_the_approved_example(db, alice):
    old, key = _dispute(db)
    out = review.approve(db, alice, key, answer="Torstraße 1, Berlin-Mitte.", expected_status="pending")
    assert out.ok and f"replaces example #{old.id}" in out.message
    assert get_example(db, old.id).status == "rejected"
    assert [e.answer for e in list_examples(db, status="approved") if "berlin" in e.question.lower()] == ["Torstraße 1, Berlin-Mitte."]


def test_keeping_the_approved_answer_rejects_the_correction(db, alice, bob):
    old, key = _dispute(db)
    out = review.keep_approved(db, bob, key, expected_status="pending")
    assert out.ok, out.message
    assert get_example(db, old.id).status == "approved" and get_example(db, old.id).answer == "Torstraße 1, Berlin."
    assert review.open_item(db, key).status == "rejected"
    assert not review.keep_approved(db, bob, "i:999999").ok


def test_safe_markdown_neutralises_images_and_html():
    assert review.safe_markdown("![x](https://t.example/p.gif)") == "\\![x](https://t.example/p.gif)"
    assert review.safe_markdown("<img src=x> & co") == "&lt;img src=x&gt; &amp; co"
    assert review.safe_markdown(None) == ""


def test_the_queue_filters_by_team_and_the_item_says_whose_it_is(db, alice):
    from store.examples import NewExample, add_examples
    from store.teams import SHARED, add_team

    add_team(db, "eng", ("C0ENG",))
    eng = record_interaction(db, question="When are deploys frozen?", answer="Fridays.", source="slack",
                             channel_id="C0ENG", user_id="U1", team="eng")
    record_vote(db, interaction_id=eng, user_id="U1", vote=-1, correction="Fridays after noon.")
    shared = record_interaction(db, question="Where is the office?", answer="Berlin.", source="slack",
                                channel_id="C_GEN", user_id="U2")
    record_vote(db, interaction_id=shared, user_id="U2", vote=1)
    add_examples(db, [NewExample("Who approves eng hires?", "The eng lead.")], status="pending", team="eng")
    [pending] = [e for e in list_examples(db, status="pending") if e.interaction_id is None]

    assert keys(review.queue(db, QueueFilter(team="eng"))) == [f"i:{eng}", f"e:{pending.id}"]
    assert keys(review.queue(db, QueueFilter(team=SHARED))) == [f"i:{shared}"]
    assert len(review.queue(db, QueueFilter())) == 3  # every team's
    assert [r["team"] for r in review.queue(db, QueueFilter(team="eng"))] == ["eng", "eng"]
    header = review.item_markdown(review.open_item(db, f"i:{eng}")).header
    assert "team eng" in header
    assert "team" not in review.item_markdown(review.open_item(db, f"i:{shared}")).header
    # Approving keeps the answer in its team: it answers and trains only eng.
    assert review.approve(db, alice, f"i:{eng}", answer="Fridays after noon.", expected_status="pending").ok
    (ex,) = [e for e in list_examples(db, status="approved") if e.interaction_id == eng]
    assert ex.team == "eng"

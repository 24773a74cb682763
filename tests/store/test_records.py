"""Votes, corrections, the curation queue, jobs, adapters and search: the store's typed functions."""

import pytest

from store import StoreError
from store.adapters import activate_adapter, active_adapter, next_version, register_adapter, rollback_adapter
from store.examples import NewExample, add_examples, approved_snapshot, list_examples, review_example
from store.interactions import record_interaction, record_vote, votes_for
from store.jobs import (
    JobAlreadyActive,
    claim_next_job,
    enqueue_job,
    fail_stale_jobs,
    finish_job,
    heartbeat,
    request_cancel,
)
from store.kb import NewPassage, replace_document, search_passages
from store.review import review_items
from store.slack_events import claim_slack_event
from store.text import search_terms


def test_latest_vote_per_user_wins(db):
    iid = record_interaction(db, question="How many leave days?", answer="25", source="slack")
    record_vote(db, interaction_id=iid, user_id="U1", vote=1)
    record_vote(db, interaction_id=iid, user_id="U1", vote=-1, correction="28 days")
    votes = votes_for(db, iid)
    assert [(v.user_id, v.vote, v.correction) for v in votes] == [("U1", -1, "28 days")]


def test_correction_becomes_pending_example_for_review(db):
    iid = record_interaction(db, question="Who approves travel?", answer="Nobody", source="slack")
    record_vote(db, interaction_id=iid, user_id="U9", vote=-1, correction="Your team lead approves travel.")
    pending = list_examples(db, status="pending")
    assert [(e.question, e.answer, e.rejected_answer, e.source) for e in pending] == [
        ("Who approves travel?", "Your team lead approves travel.", "Nobody", "feedback")]
    queue = review_items(db)
    assert queue[0]["id"] == iid and queue[0]["down"] == 1 and queue[0]["status"] == "pending"
    ex = review_example(db, pending[0].id, decision="approved", reviewer="alice", answer="Team leads approve travel.")
    assert ex.status == "approved" and ex.reviewer == "alice" and ex.answer == "Team leads approve travel."


def test_vote_on_unknown_interaction_is_refused(db):
    with pytest.raises(StoreError, match="no interaction with id 42"):
        record_vote(db, interaction_id=42, user_id="U1", vote=1)
    with pytest.raises(StoreError, match="vote must be"):
        iid = record_interaction(db, question="q", answer="a", source="cli")
        record_vote(db, interaction_id=iid, user_id="U1", vote=0)


def test_duplicate_questions_are_skipped_and_snapshot_hash_tracks_changes(db):
    added, dupes = add_examples(db, [NewExample("What is the VPN?", "WireGuard"), NewExample("what is the  VPN?", "x")])
    assert (added, dupes) == (1, 1)
    _, h1 = approved_snapshot(db)
    ex = list_examples(db)[0]
    review_example(db, ex.id, decision="approved", reviewer="bob", answer="WireGuard on port 51820")
    _, h2 = approved_snapshot(db)
    assert h1 != h2


def test_slack_event_claimed_once(db):
    assert claim_slack_event(db, "Ev1") is True
    assert claim_slack_event(db, "Ev1") is False


def test_jobs_one_at_a_time_and_stale_detection(db):
    job = enqueue_job(db, requester="U1")
    with pytest.raises(JobAlreadyActive) as info:
        enqueue_job(db, requester="U2")
    assert info.value.job.id == job.id
    claimed = claim_next_job(db, worker_id="w1")
    assert claimed.id == job.id and claimed.status == "running"
    assert claim_next_job(db, worker_id="w2") is None
    assert heartbeat(db, job.id, progress={"step": 1}) is False
    request_cancel(db, job.id)
    assert heartbeat(db, job.id) is True
    failed = fail_stale_jobs(db, stale_after_s=-1)  # every heartbeat is "old"
    assert [j.id for j in failed] == [job.id] and "stopped responding" in failed[0].error
    with pytest.raises(StoreError):
        finish_job(db, job.id, status="exploded")


def test_adapter_activation_and_rollback_history(db):
    for _ in range(3):
        v = next_version(db)
        register_adapter(db, version=v, path=f"/a/{v}", base_model="tiny", method="lora", params={}, dataset_hash="h",
                         dataset_size=1, metrics={})
    activate_adapter(db, "v1")
    activate_adapter(db, "v2")
    activate_adapter(db, "v3")
    assert rollback_adapter(db)[1].version == "v2"
    assert rollback_adapter(db)[1].version == "v1"
    frm, to = rollback_adapter(db)
    assert frm.version == "v1" and to is None and active_adapter(db) is None
    with pytest.raises(StoreError, match="nothing to roll back"):
        rollback_adapter(db)


def test_search_finds_chinese_and_english(db):
    replace_document(db, "zh/expenses.md", [NewPassage("zh/expenses.md", "报销流程", 0, "出差费用需在三十天内通过财务系统提交报销。")])
    replace_document(db, "vpn.md", [NewPassage("vpn.md", "VPN setup", 0, "Install WireGuard and import the profile.")])
    assert search_passages(db, "怎么报销出差费用")[0][0].doc_path == "zh/expenses.md"
    assert search_passages(db, "how do I set up wireguard")[0][0].doc_path == "vpn.md"
    assert search_passages(db, "???") == []


def test_search_terms_split_chinese_into_bigrams():
    assert search_terms("报销流程 VPN") == ["报销", "销流", "流程", "vpn"]
    assert search_terms("年假") == ["年假"]

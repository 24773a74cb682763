"""Four processes recording votes at once lose none and never see "database is locked"."""

import multiprocessing as mp

import pytest

from store import open_db
from store.interactions import record_interaction, record_vote

VOTES_PER_PROCESS = 1000


def _vote_many(db_path: str, worker: int, interaction_ids: list[int], errors) -> None:
    db = open_db(db_path)
    try:
        for i in range(VOTES_PER_PROCESS):
            # Distinct (interaction, user) pairs: every vote must land as its own row.
            record_vote(db, interaction_id=interaction_ids[i % len(interaction_ids)], user_id=f"U{worker}-{i}",
                        vote=1 if i % 3 else -1)
    except Exception as exc:  # reported to the parent, which fails the test
        errors.put(f"{worker}: {exc!r}")


@pytest.mark.slow
def test_four_processes_record_4000_votes(db_path):
    db = open_db(db_path)
    ids = [record_interaction(db, question=f"q{i}", answer="a", source="cli") for i in range(10)]
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    procs = [ctx.Process(target=_vote_many, args=(str(db_path), w, ids, errors)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    problems = []
    while not errors.empty():
        problems.append(errors.get())
    assert problems == []
    assert all(p.exitcode == 0 for p in procs)
    assert db.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == 4 * VOTES_PER_PROCESS


def test_writers_of_one_process_queue_on_a_lock_not_in_sqlites_busy_handler(db_path):
    """A second thread's write waits for the first to commit, even with no busy timeout at all: without the
    process's writer lock its BEGIN IMMEDIATE would fail at once with "database is locked"."""
    import threading

    from store.db import write_transaction

    open_db(db_path)
    holding, release = threading.Event(), threading.Event()
    outcome: list[object] = []

    def first() -> None:
        db = open_db(db_path)
        with write_transaction(db):
            db.execute("INSERT INTO audit_log (action, actor, allowed, created_at) VALUES ('first', 't', 1, 'now')")
            holding.set()
            release.wait(10)

    def second() -> None:
        db = open_db(db_path)
        db.conn.execute("PRAGMA busy_timeout=0")
        try:
            with write_transaction(db):
                db.execute("INSERT INTO audit_log (action, actor, allowed, created_at) VALUES ('second', 't', 1, 'now')")
            outcome.append("written")
        except Exception as exc:  # noqa: BLE001 - the assertion below shows it
            outcome.append(exc)

    a = threading.Thread(target=first)
    a.start()
    assert holding.wait(10)
    b = threading.Thread(target=second)
    b.start()
    b.join(0.3)
    assert b.is_alive() and outcome == []  # waiting on the lock, not failed
    release.set()
    a.join(10)
    b.join(10)
    assert outcome == ["written"]
    actions = [r[0] for r in open_db(db_path).execute("SELECT action FROM audit_log WHERE actor = 't' ORDER BY id")]
    assert actions == ["first", "second"]


def test_deliveries_that_arrive_together_are_stored_in_one_transaction(db_path, monkeypatch):
    """While an answer being recorded holds the write lock, 20 acknowledgements queue up; once it commits they
    are stored in two or three transactions (the first thread's and everyone else's), none lost, and a retry of
    a waiting delivery is recognised. Without the group commit it takes 20."""
    import threading
    import time

    import store.slack_inbox as inbox
    from store.db import local_db, write_transaction

    db = open_db(db_path)
    commits: list[int] = []
    real_put = inbox.put_slack_events
    monkeypatch.setattr(inbox, "put_slack_events", lambda d, group: commits.append(len(group)) or real_put(d, group))
    group_commit = inbox.GroupCommit(lambda: local_db(db_path))
    outcomes: dict[str, bool] = {}

    def deliver(event_id: str) -> None:
        outcomes[event_id + ("/retry" if event_id in outcomes else "")] = group_commit.put(
            inbox.Delivery(event_id, '{"event_id": "%s"}' % event_id, {"content-type": "application/json"}))

    ready = threading.Barrier(21)
    with write_transaction(db):  # an answer being recorded
        threads = [threading.Thread(target=lambda i=i: (ready.wait(10), deliver(f"Ev{i}"))) for i in range(20)]
        for t in threads:
            t.start()
        ready.wait(10)
        time.sleep(0.5)  # every thread has queued its delivery behind the lock
    for t in threads:
        t.join(10)
    assert sorted(outcomes) == sorted(f"Ev{i}" for i in range(20)) and all(outcomes.values())
    assert sum(commits) == 20 and len(commits) <= 3, commits
    assert inbox.count_pending_slack_events(db) == 20
    deliver("Ev3")  # Slack's retry of a delivery still waiting
    assert outcomes["Ev3/retry"] is False and inbox.count_pending_slack_events(db) == 20


def test_a_failed_group_commit_refuses_every_delivery_of_the_group(db_path):
    """Each request of a group that could not be stored hears so (and answers 503, so Slack retries it)."""
    import sqlite3

    import store.slack_inbox as inbox
    from store.db import local_db

    db = open_db(db_path)
    db.execute("DROP TABLE slack_event_inbox")
    group_commit = inbox.GroupCommit(lambda: local_db(db_path))
    with pytest.raises(sqlite3.OperationalError, match="slack_event_inbox"):
        group_commit.put(inbox.Delivery("Ev1", "{}", {}))

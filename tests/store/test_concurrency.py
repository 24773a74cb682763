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

"""Pins the whole schema: a schema change shows up here as one clear failing assertion."""

import sqlite3

import pytest

from store import NewerDatabaseError, StoreError, open_db
from store.db import schema_version
from store.migrations import MIGRATIONS

SCHEMA = {
    "kb_docs": {
        "columns": {"id": int, "doc_path": str, "title": str, "chunk_index": int, "content": str, "search_text": str,
                    "content_hash": str, "embedding": bytes, "embedding_model": str, "created_at": str, "team": str},
        # A path is unique per team: the first column is the expression COALESCE(team, '') (store.migrations m120).
        "indexes": {(("content_hash",), False), ((None, "doc_path", "chunk_index"), True)},
        "fks": set(),
    },
    "interactions": {
        "columns": {"id": int, "question": str, "answer": str, "source": str, "user_id": str, "channel_id": str,
                    "thread_ts": str, "message_ts": str, "event_id": str, "adapter_version": str, "sources": str,
                    "latency_ms": int, "created_at": str, "verified_example_id": int, "team": str},
        "indexes": {(("channel_id", "message_ts"), False), (("created_at",), False)},
        "fks": {("verified_example_id", "examples", "id")},
    },
    "example_embeddings": {
        "columns": {"example_id": int, "model": str, "text_hash": str, "vector": bytes},
        "indexes": set(),
        "fks": {("example_id", "examples", "id")},
    },
    "feedback": {
        "columns": {"id": int, "interaction_id": int, "user_id": str, "vote": int, "correction": str, "source": str,
                    "created_at": str, "updated_at": str},
        "indexes": {(("interaction_id", "user_id"), True)},
        "fks": {("interaction_id", "interactions", "id")},
    },
    "examples": {
        "columns": {"id": int, "question": str, "input": str, "answer": str, "status": str, "source": str,
                    "interaction_id": int, "rejected_answer": str, "content_hash": str, "reviewer": str,
                    "reviewed_at": str, "note": str, "created_at": str, "updated_at": str, "disputes_example_id": int,
                    "sensitive_confirmed": str, "team": str},
        "indexes": {(("content_hash",), True), (("interaction_id",), False), (("status",), False), (("team",), False)},
        "fks": {("interaction_id", "interactions", "id"), ("disputes_example_id", "examples", "id")},
    },
    "adapters": {
        "columns": {"version": str, "path": str, "base_model": str, "method": str, "params": str, "dataset_hash": str,
                    "dataset_size": int, "metrics": str, "status": str, "job_id": int, "note": str,
                    "created_at": str, "activated_at": str, "rolled_back_at": str, "team": str},
        "indexes": {(("status",), False), (("version",), True), (("team", "status"), False)},
        "fks": set(),
    },
    "jobs": {
        "columns": {"id": int, "kind": str, "status": str, "requester": str, "reply_channel": str,
                    "reply_thread_ts": str, "params": str, "progress": str, "result": str, "error": str,
                    "worker_id": str, "pid": int, "cancel_requested": int, "created_at": str, "started_at": str,
                    "heartbeat_at": str, "finished_at": str},
        "indexes": {(("status",), False)},
        "fks": set(),
    },
    "train_steps": {
        "columns": {"id": int, "run": str, "job_id": int, "step": int, "epoch": float, "loss": float,
                    "learning_rate": float, "created_at": str},
        "indexes": {(("run", "step"), False)},
        "fks": {("job_id", "jobs", "id")},
    },
    "audit_log": {
        "columns": {"id": int, "actor": str, "action": str, "target": str, "allowed": int, "detail": str,
                    "created_at": str},
        "indexes": {(("created_at",), False)},
        "fks": set(),
    },
    "interaction_reviews": {
        "columns": {"interaction_id": int, "decision": str, "example_id": int, "reviewer": str, "reviewed_at": str},
        "indexes": set(),
        "fks": {("interaction_id", "interactions", "id"), ("example_id", "examples", "id")},
    },
    "bot_errors": {
        "columns": {"id": int, "kind": str, "event_id": str, "user_id": str, "channel_id": str, "error": str,
                    "detail": str, "created_at": str},
        "indexes": {(("created_at",), False)},
        "fks": set(),
    },
    "slack_events": {
        "columns": {"event_id": str, "received_at": str},
        "indexes": {(("event_id",), True)},
        "fks": set(),
    },
    "slack_event_inbox": {
        "columns": {"id": int, "event_id": str, "body": str, "headers": str, "received_at": str},
        "indexes": {(("event_id",), True)},
        "fks": set(),
    },
    "teams": {
        "columns": {"name": str, "channels": str, "created_at": str},
        "indexes": {(("name",), True)},
        "fks": set(),
    },
    "assistant_threads": {
        "columns": {"channel_id": str, "thread_ts": str, "user_id": str, "context": str, "updated_at": str},
        "indexes": {(("channel_id", "thread_ts"), True)},
        "fks": set(),
    },
}


@pytest.mark.parametrize("table", sorted(SCHEMA))
def test_table_schema_is_pinned(db, table):
    t = db[table]
    assert t.columns_dict == SCHEMA[table]["columns"]
    assert {(tuple(i.columns), bool(i.unique)) for i in t.indexes} == SCHEMA[table]["indexes"]
    assert {(f.column, f.other_table, f.other_column) for f in t.foreign_keys} == SCHEMA[table]["fks"]


def test_no_unexpected_tables(db):
    fts_shadow = {"kb_docs_fts", "kb_docs_fts_data", "kb_docs_fts_idx", "kb_docs_fts_docsize", "kb_docs_fts_config"}
    assert set(db.table_names()) == set(SCHEMA) | fts_shadow | {"_sqlite_migrations"}


def test_fts_triggers_keep_index_in_sync(db):
    assert {t.name for t in db["kb_docs"].triggers} == {"kb_docs_ai", "kb_docs_ad", "kb_docs_au"}
    assert db["kb_docs"].detect_fts() == "kb_docs_fts"


def test_pragmas(db):
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] >= 5000


def test_foreign_keys_enforced(db):
    with pytest.raises(sqlite3.IntegrityError):
        db.execute("INSERT INTO feedback (interaction_id, user_id, vote, created_at, updated_at) VALUES (999, 'U1', 1, 'x', 'x')")


def test_migrations_applied_twice_change_nothing(db_path):
    db = open_db(db_path)
    before = db.execute("SELECT name, sql FROM sqlite_master ORDER BY name").fetchall()
    applied = schema_version(db)
    db2 = open_db(db_path)
    assert db2.execute("SELECT name, sql FROM sqlite_master ORDER BY name").fetchall() == before
    assert schema_version(db2) == applied == [m.name for m in MIGRATIONS._migrations]


def test_failed_migration_leaves_database_as_it_was(db_path, monkeypatch):
    db = open_db(db_path)
    db["examples"].insert({"question": "q", "input": "", "answer": "a", "status": "approved", "source": "import",
                           "content_hash": "h", "created_at": "t", "updated_at": "t"})
    before = db.execute("SELECT name, sql FROM sqlite_master ORDER BY name").fetchall()
    db.conn.close()

    def m999_broken(db):
        db["examples"].add_column("half_done", str)
        db.execute("CREATE TABLE half_table (x)")
        raise RuntimeError("boom")

    monkeypatch.setattr(MIGRATIONS, "_migrations", MIGRATIONS._migrations + [MIGRATIONS._Migration("m999_broken", m999_broken)])
    with pytest.raises(RuntimeError, match="boom"):
        open_db(db_path)
    monkeypatch.undo()
    db = open_db(db_path)
    assert db.execute("SELECT name, sql FROM sqlite_master ORDER BY name").fetchall() == before
    assert "m999_broken" not in schema_version(db)
    assert db.execute("SELECT COUNT(*) FROM examples").fetchone()[0] == 1


def test_database_from_newer_kbloop_is_refused_untouched(db_path):
    db = open_db(db_path)
    db["_sqlite_migrations"].insert({"migration_set": "kbloop", "name": "m900_from_the_future", "applied_at": "2099"})
    db.conn.close()
    before = db_path.read_bytes()
    with pytest.raises(NewerDatabaseError, match="newer kbloop.*m900_from_the_future"):
        open_db(db_path)
    assert db_path.read_bytes() == before


def test_not_a_database_is_a_clear_error(tmp_path):
    bad = tmp_path / "notes.db"
    bad.write_text("hello, I am not SQLite " * 100)
    with pytest.raises(StoreError, match="not a usable SQLite database"):
        open_db(bad)


def test_a_traditional_chinese_passage_indexed_before_folding_is_reindexed(db_path):
    """m130: passages written in traditional characters were indexed as written; questions are now folded into
    simplified (store.text.fold_script), so the migration re-indexes those passages and no other."""
    from store.kb import search_passages

    db = open_db(db_path)
    for doc, title, content in (("tw.md", "叉車證", "叉車證每三年複審一次。"), ("en.md", "VPN", "Install WireGuard."),
                                ("zh.md", "食堂", "食堂在二号楼。")):
        db["kb_docs"].insert({"doc_path": doc, "title": title, "chunk_index": 0, "content": content,
                              "search_text": f"kept {doc}", "content_hash": doc, "created_at": "t"})
    db.execute("UPDATE kb_docs SET search_text = '叉車 車證 叉車證 每三 三年 複審' WHERE doc_path = 'tw.md'")
    db.execute("DELETE FROM _sqlite_migrations WHERE name = 'm130_kb_search_text_folded'")
    db.conn.commit()
    db.conn.close()
    db = open_db(db_path)
    rows = dict(db.execute("SELECT doc_path, search_text FROM kb_docs").fetchall())
    assert "叉车" in rows["tw.md"].split() and "复审" in rows["tw.md"].split()
    assert (rows["en.md"], rows["zh.md"]) == ("kept en.md", "kept zh.md")  # nothing folds: left as it was
    assert [p.doc_path for p, _ in search_passages(db, "叉车证多久复审", limit=3)] == ["tw.md"]  # FTS follows

"""Numbered schema migrations. Never edit a released migration: add the next number.

Applied by `store.db.open_db` inside one IMMEDIATE transaction, recorded in `_sqlite_migrations`.
Table and column names listed in ARCHITECTURE.md ("Store") are read by outside tools; keep them.
"""

from __future__ import annotations

from sqlite_utils import Migrations

MIGRATIONS = Migrations("kbloop")


@MIGRATIONS()
def m001_initial(db) -> None:
    # Knowledge-base passages. `search_text` is what FTS indexes: the title and body with Chinese
    # runs split into overlapping character bigrams (FTS5's unicode61 tokenizer would otherwise see a
    # whole Chinese sentence as one token). `embedding` is float32 little-endian, filled at import.
    db["kb_docs"].create(
        {
            "id": int,
            "doc_path": str,
            "title": str,
            "chunk_index": int,
            "content": str,
            "search_text": str,
            "content_hash": str,
            "embedding": bytes,
            "embedding_model": str,
            "created_at": str,
        },
        pk="id",
        not_null={"doc_path", "title", "chunk_index", "content", "search_text", "content_hash", "created_at"},
    )
    db["kb_docs"].create_index(["doc_path", "chunk_index"], unique=True)
    db["kb_docs"].create_index(["content_hash"])
    db["kb_docs"].enable_fts(["search_text"], create_triggers=True, tokenize="unicode61")

    db["interactions"].create(
        {
            "id": int,
            "question": str,
            "answer": str,
            "source": str,  # slack | cli | playground
            "user_id": str,
            "channel_id": str,
            "thread_ts": str,
            "message_ts": str,
            "event_id": str,
            "adapter_version": str,
            "sources": str,  # JSON list of {"title", "doc_path"}
            "latency_ms": int,
            "created_at": str,
        },
        pk="id",
        not_null={"question", "answer", "source", "created_at"},
    )
    db["interactions"].create_index(["created_at"])
    db["interactions"].create_index(["channel_id", "message_ts"])

    db["feedback"].create(
        {
            "id": int,
            "interaction_id": int,
            "user_id": str,
            "vote": int,  # +1 / -1
            "correction": str,
            "source": str,  # slack | playground
            "created_at": str,
            "updated_at": str,
        },
        pk="id",
        foreign_keys=[("interaction_id", "interactions", "id")],
        not_null={"interaction_id", "user_id", "vote", "created_at", "updated_at"},
    )
    db["feedback"].create_index(["interaction_id", "user_id"], unique=True)

    db["examples"].create(
        {
            "id": int,
            "question": str,
            "input": str,
            "answer": str,
            "status": str,  # pending | approved | rejected
            "source": str,  # import | feedback | playground
            "interaction_id": int,
            "rejected_answer": str,  # the answer a correction replaced (DPO's "rejected")
            "content_hash": str,
            "reviewer": str,
            "reviewed_at": str,
            "note": str,
            "created_at": str,
            "updated_at": str,
        },
        pk="id",
        foreign_keys=[("interaction_id", "interactions", "id")],
        not_null={"question", "input", "answer", "status", "source", "content_hash", "created_at", "updated_at"},
        defaults={"input": ""},
    )
    db["examples"].create_index(["content_hash"], unique=True)
    db["examples"].create_index(["status"])
    db["examples"].create_index(["interaction_id"])

    db["adapters"].create(
        {
            "version": str,
            "path": str,
            "base_model": str,
            "method": str,  # qlora | lora | full
            "params": str,  # JSON
            "dataset_hash": str,
            "dataset_size": int,
            "metrics": str,  # JSON
            "status": str,  # candidate | active | retired
            "job_id": int,
            "note": str,
            "created_at": str,
            "activated_at": str,
            "rolled_back_at": str,
        },
        pk="version",
        not_null={"path", "base_model", "method", "status", "created_at"},
    )
    db["adapters"].create_index(["status"])

    db["jobs"].create(
        {
            "id": int,
            "kind": str,  # retrain
            "status": str,  # queued | running | succeeded | failed | cancelled
            "requester": str,
            "reply_channel": str,  # where to report progress: a Slack channel / DM, or null
            "reply_thread_ts": str,
            "params": str,  # JSON
            "progress": str,  # JSON: phase, step, total, loss, eta_s … (finetune.jobs.protocol.JobProgress)
            "result": str,  # JSON
            "error": str,
            "worker_id": str,
            "pid": int,
            "cancel_requested": int,
            "created_at": str,
            "started_at": str,
            "heartbeat_at": str,
            "finished_at": str,
        },
        pk="id",
        not_null={"kind", "status", "created_at"},
        defaults={"cancel_requested": 0},
    )
    db["jobs"].create_index(["status"])

    # Per-step training log; the playground plots it, Slack reports it.
    db["train_steps"].create(
        {
            "id": int,
            "run": str,  # the adapter version being trained
            "job_id": int,
            "step": int,
            "epoch": float,
            "loss": float,
            "learning_rate": float,
            "created_at": str,
        },
        pk="id",
        foreign_keys=[("job_id", "jobs", "id")],
        not_null={"run", "step", "created_at"},
    )
    db["train_steps"].create_index(["run", "step"])

    db["audit_log"].create(
        {
            "id": int,
            "actor": str,
            "action": str,
            "target": str,
            "allowed": int,
            "detail": str,  # JSON
            "created_at": str,
        },
        pk="id",
        not_null={"actor", "action", "allowed", "created_at"},
    )
    db["audit_log"].create_index(["created_at"])

    # Slack event ids already handled, so a retried delivery never answers twice, across restarts.
    db["slack_events"].create(
        {"event_id": str, "received_at": str},
        pk="event_id",
        not_null={"received_at"},
    )


@MIGRATIONS()
def m060_interaction_reviews(db) -> None:
    # A curator's decision on an answer in the playground's review queue. Approving one creates an
    # example (tied through examples.interaction_id); rejecting or merging one that has no example needs
    # a record of its own, or the answer would stay in the queue forever.
    db["interaction_reviews"].create(
        {
            "interaction_id": int,
            "decision": str,  # approved | rejected | merged
            "example_id": int,  # the example it became or was merged into
            "reviewer": str,
            "reviewed_at": str,
        },
        pk="interaction_id",
        foreign_keys=[("interaction_id", "interactions", "id"), ("example_id", "examples", "id")],
        not_null={"decision", "reviewer", "reviewed_at"},
    )


@MIGRATIONS()
def m040_bot_errors(db) -> None:
    # A Slack handler that fails still answers Slack 200 (a non-200 makes Slack retry and, repeated, turn
    # the app's events off), so the failure is kept here for an admin to read instead of being lost.
    db["bot_errors"].create(
        {
            "id": int,
            "kind": str,  # event | command | action | view | answer | notify
            "event_id": str,
            "user_id": str,
            "channel_id": str,
            "error": str,  # exception type and message
            "detail": str,  # JSON: traceback tail, payload summary
            "created_at": str,
        },
        pk="id",
        not_null={"kind", "error", "created_at"},
    )
    db["bot_errors"].create_index(["created_at"])


@MIGRATIONS()
def m070_verified_answers(db) -> None:
    # Approved examples are searchable knowledge (verified answers): each approved question's embedding,
    # under the name of the model that made it and the hash of the text it was made from, so that an edit
    # or a change of embedder re-embeds instead of comparing vectors of two models.
    db["example_embeddings"].create(
        {"example_id": int, "model": str, "text_hash": str, "vector": bytes},
        pk="example_id",
        foreign_keys=[("example_id", "examples", "id")],
        not_null={"model", "text_hash", "vector"},
    )
    # Which approved example an answer repeated, when it was a verified answer (NULL: generated).
    db["interactions"].add_column("verified_example_id", int, fk="examples", fk_col="id")


@MIGRATIONS()
def m080_kb_search_text_words(db) -> None:
    # Issue 15: Chinese in the full-text index is segmented into words (jieba) as well as character bigrams.
    # Passages imported before keep their old search_text until it is rebuilt here; the FTS triggers
    # re-index each updated row.
    from store.text import search_text

    rows = db.execute("SELECT id, title, content FROM kb_docs").fetchall()
    db.conn.executemany("UPDATE kb_docs SET search_text = ? WHERE id = ?",
                        [(search_text(title + "\n" + content), pid) for pid, title, content in rows])


@MIGRATIONS()
def m090_slack_event_inbox(db) -> None:
    # Issue 16: Events API deliveries are acknowledged (200) before the listeners run. Each one is written
    # here first and deleted once dispatched, so a delivery acknowledged just before a crash or a restart
    # is still handled after it (Slack will not send it again: it got its 200). `event_id` is unique: a
    # retry that arrives while the first delivery still waits here adds nothing.
    db["slack_event_inbox"].create(
        {
            "id": int,
            "event_id": str,
            "body": str,  # the request body as Slack sent it (JSON text), already verified
            "headers": str,  # JSON: the headers the listeners read (content type, X-Slack-Retry-Num / -Reason)
            "received_at": str,
        },
        pk="id",
        not_null={"event_id", "body", "headers", "received_at"},
    )
    db["slack_event_inbox"].create_index(["event_id"], unique=True)


@MIGRATIONS()
def m100_example_disputes(db) -> None:
    # Issue 16 (security review, finding 1): a 👎 correction of a question that already has an example becomes its
    # own pending example pointing at the one it disputes, instead of overwriting a curator's approved answer. The
    # approved answer keeps training and serving until a curator approves the correction (which retires it).
    db["examples"].add_column("disputes_example_id", int, fk="examples", fk_col="id")
    # Findings 4 and 5: the content hash (store.examples.confirmation_hash) of a text that a person approved although
    # the scan flagged it ("approve anyway"). Training start leaves out flagged approved examples unless this still
    # matches their text: an edit after the confirmation needs a new one.
    db["examples"].add_column("sensitive_confirmed", str)


@MIGRATIONS()
def m110_assistant_threads(db) -> None:
    # Issue 18: the Slack AI-app surface. An assistant thread's context (the channel the user is looking at,
    # from assistant_thread_started / assistant_thread_context_changed) is kept here, so that a team's
    # adapter can be picked by the channel the user is looking at once teams route by it.
    db["assistant_threads"].create(
        {
            "channel_id": str,  # the DM the assistant thread lives in
            "thread_ts": str,
            "user_id": str,
            "context": str,  # JSON, as Slack sent it: {"channel_id", "team_id", "enterprise_id"}
            "updated_at": str,
        },
        pk=("channel_id", "thread_ts"),
        not_null={"channel_id", "thread_ts", "context", "updated_at"},
    )


@MIGRATIONS()
def m120_teams(db) -> None:
    # Issue 20: teams. A team owns Slack channels (a question asked there, or in an assistant thread looking at one,
    # is the team's); examples, passages, interactions and adapters may belong to one (`team`, the team's name).
    # NULL is shared: every team sees shared rows, a question with no team sees only them. No foreign key to
    # `teams`: removing a team keeps its rows under its name, private to nobody's questions (store.teams).
    db["teams"].create(
        {
            "name": str,
            "channels": str,  # JSON list of Slack channel ids, in the order given
            "created_at": str,
        },
        pk="name",
        not_null={"channels", "created_at"},
    )
    for table in ("examples", "kb_docs", "interactions", "adapters"):
        db[table].add_column("team", str)
    # A document's path is unique within a team (and among shared documents), not across teams: two teams may each
    # have their own "handbook/vpn.md". COALESCE because a unique index treats NULLs as distinct.
    db.execute("DROP INDEX idx_kb_docs_doc_path_chunk_index")
    db.execute("CREATE UNIQUE INDEX idx_kb_docs_team_doc_path_chunk_index "
               "ON kb_docs (COALESCE(team, ''), doc_path, chunk_index)")
    db["examples"].create_index(["team"])
    db["adapters"].create_index(["team", "status"])


@MIGRATIONS()
def m130_kb_search_text_folded(db) -> None:
    # Traditional Chinese is indexed and queried as simplified (store.text.fold_script). A passage written in
    # traditional characters and indexed before would no longer match the folded question's words; it is
    # re-indexed here: only those that folding changes (the FTS triggers follow each update).
    from store.text import CJK_CHAR, fold_script, search_text

    rows = db.execute("SELECT id, title, content FROM kb_docs").fetchall()
    db.conn.executemany("UPDATE kb_docs SET search_text = ? WHERE id = ?", [
        (search_text(title + "\n" + content), pid) for pid, title, content in rows
        if CJK_CHAR.search(title + content) and fold_script(title + "\n" + content) != title + "\n" + content])

"""Knowledge-base passages (`kb_docs`) and their full-text index."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import sqlite_utils

from store.db import write_transaction
from store.teams import visible_to
from store.text import content_hash, fts_query, now, search_text


@dataclass(frozen=True)
class Passage:
    id: int
    doc_path: str
    title: str
    chunk_index: int
    content: str
    team: str | None = None  # None: shared (store.teams)


@dataclass(frozen=True)
class NewPassage:
    doc_path: str
    title: str
    chunk_index: int
    content: str


def _row_to_passage(row: dict) -> Passage:
    return Passage(row["id"], row["doc_path"], row["title"], row["chunk_index"], row["content"], row["team"])


def replace_document(db: sqlite_utils.Database, doc_path: str, passages: list[NewPassage], *,
                     team: str | None = None) -> tuple[int, bool]:
    """Store a document's passages, replacing an older version of the same document of the same team (`team`
    None: shared; each team has its own documents, paths may repeat across teams).

    Returns (number of passages, changed). An unchanged document keeps its rows (and embeddings).
    """
    with write_transaction(db):
        existing = {r["chunk_index"]: r["content_hash"]
                    for r in db["kb_docs"].rows_where("doc_path = ? AND team IS ?", [doc_path, team])}
        new_hashes = {p.chunk_index: content_hash(p.title, p.content) for p in passages}
        if existing == new_hashes:
            return len(passages), False
        db.execute("DELETE FROM kb_docs WHERE doc_path = ? AND team IS ?", [doc_path, team])
        stamp = now()
        db["kb_docs"].insert_all(
            {
                "doc_path": p.doc_path,
                "title": p.title,
                "chunk_index": p.chunk_index,
                "content": p.content,
                "search_text": search_text(p.title + "\n" + p.content),
                "content_hash": new_hashes[p.chunk_index],
                "team": team,
                "created_at": stamp,
            }
            for p in passages
        )
    return len(passages), True


def search_passages(db: sqlite_utils.Database, query: str, *, limit: int = 5,
                    team: str | None = None) -> list[tuple[Passage, float]]:
    """BM25 full-text search over the passages a question of `team` may see (its own and the shared ones; None:
    shared only); higher score is better (FTS5's bm25() is negated)."""
    match = fts_query(query)
    if match is None:
        return []
    visible, args = visible_to(team, "kb_docs.team")
    rows = db.execute(
        f"""
        SELECT kb_docs.id, doc_path, title, chunk_index, content, team, -bm25(kb_docs_fts) AS score
        FROM kb_docs_fts JOIN kb_docs ON kb_docs.id = kb_docs_fts.rowid
        WHERE kb_docs_fts MATCH ? AND {visible}
        ORDER BY bm25(kb_docs_fts) LIMIT ?
        """,
        [match, *args, limit],
    ).fetchall()
    return [(Passage(*r[:6]), float(r[6])) for r in rows]


def get_passages(db: sqlite_utils.Database, ids: Iterable[int]) -> list[Passage]:
    ids = list(ids)
    if not ids:
        return []
    marks = ",".join("?" * len(ids))
    rows = {r["id"]: r for r in db.query(f"SELECT * FROM kb_docs WHERE id IN ({marks})", ids)}
    return [_row_to_passage(rows[i]) for i in ids if i in rows]



def passages_missing_embedding(db: sqlite_utils.Database, model_name: str) -> list[Passage]:
    rows = db.query(
        "SELECT * FROM kb_docs WHERE embedding IS NULL OR embedding_model IS NOT ? ORDER BY id", [model_name]
    )
    return [_row_to_passage(r) for r in rows]


def set_embeddings(db: sqlite_utils.Database, model_name: str, embeddings: dict[int, bytes]) -> None:
    with write_transaction(db):
        db.conn.executemany(
            "UPDATE kb_docs SET embedding = ?, embedding_model = ? WHERE id = ?",
            [(blob, model_name, pid) for pid, blob in embeddings.items()],
        )


def all_embeddings(db: sqlite_utils.Database, model_name: str) -> list[tuple[int, bytes]]:
    return [
        (r[0], r[1])
        for r in db.execute(
            "SELECT id, embedding FROM kb_docs WHERE embedding IS NOT NULL AND embedding_model = ? ORDER BY id",
            [model_name],
        ).fetchall()
    ]


def index_rows(db: sqlite_utils.Database, model_name: str) -> list[tuple[int, bytes, str, Passage]]:
    """(id, embedding, search_text, passage) of every passage embedded with `model_name`: what a search index
    keeps in memory."""
    return [
        (r[0], r[1], r[2], Passage(r[0], *r[3:]))
        for r in db.execute(
            """SELECT id, embedding, search_text, doc_path, title, chunk_index, content, team FROM kb_docs
               WHERE embedding IS NOT NULL AND embedding_model = ? ORDER BY id""",
            [model_name],
        ).fetchall()
    ]


@dataclass(frozen=True)
class DocumentInfo:
    doc_path: str
    title: str
    passages: int
    team: str | None
    updated_at: str  # when its current passages were stored

    def to_dict(self) -> dict:
        return {"doc_path": self.doc_path, "title": self.title, "passages": self.passages, "team": self.team,
                "updated_at": self.updated_at}


def list_documents(db: sqlite_utils.Database, *, team: str | None = None, every_team: bool = False) -> list[DocumentInfo]:
    """The documents of `team` (None: the shared ones), or of every team and the shared ones, by path."""
    where, params = ("", []) if every_team else ("WHERE team IS ?", [team])
    rows = db.execute(
        f"""SELECT doc_path, MIN(title), COUNT(*), team, MAX(created_at)
            FROM kb_docs {where} GROUP BY COALESCE(team, ''), doc_path ORDER BY COALESCE(team, ''), doc_path""",
        params).fetchall()
    return [DocumentInfo(r[0], r[1] or "", int(r[2]), r[3], r[4]) for r in rows]


def delete_documents(db: sqlite_utils.Database, doc_paths: Iterable[str], *, team: str | None = None) -> int:
    """Remove these documents of `team` (None: shared) in one transaction; returns the passages removed."""
    removed = 0
    with write_transaction(db):
        for doc_path in doc_paths:
            removed += db.execute("DELETE FROM kb_docs WHERE doc_path = ? AND team IS ?", [doc_path, team]).rowcount
    return removed


def kb_stats(db: sqlite_utils.Database) -> dict:
    # A team's document may share its path with a shared one (or another team's): they are two documents.
    row = db.execute("SELECT COUNT(DISTINCT COALESCE(team, '') || char(0) || doc_path), COUNT(*) FROM kb_docs").fetchone()
    return {"documents": row[0], "passages": row[1]}


def all_kb_text(db: sqlite_utils.Database) -> Iterable[str]:
    for r in db.execute("SELECT title, content FROM kb_docs ORDER BY id"):
        yield r[0] + "\n" + r[1]


def kb_fingerprint(db: sqlite_utils.Database) -> tuple[int, int, str]:
    """(passages, max id, digest of every passage's id and content hash): changes whenever a passage is added,
    replaced or removed, so a cached search index knows it is stale. It reads only the content_hash index:
    the embedding blobs (kilobytes a passage) sit before the later columns, and a scan that touched them
    cost ~20 ms a question on a 1,000-passage KB. The ids matter: SQLite reuses the id of a deleted last row."""
    row = db.execute(
        """SELECT COUNT(*), COALESCE(MAX(id), 0), COALESCE(group_concat(content_hash || ':' || id, ','), '')
           FROM (SELECT content_hash, id FROM kb_docs ORDER BY content_hash, id)"""
    ).fetchone()
    return int(row[0]), int(row[1]), hashlib.sha1(row[2].encode()).hexdigest()


def count_missing_embeddings(db: sqlite_utils.Database, model_name: str) -> int:
    return int(db.execute("SELECT COUNT(*) FROM kb_docs WHERE embedding IS NULL OR embedding_model IS NOT ?",
                          [model_name]).fetchone()[0])

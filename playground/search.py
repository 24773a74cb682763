"""Search tab: the passages the bot would retrieve for a question, best first, with the evidence behind each
rank, so that a curator can see why an answer cited what it did, or why the bot found nothing. The same
search as `kbloop kb search` (finetune.serving.retrieval.retrieve_scored)."""

from __future__ import annotations

import sqlite_utils

from finetune.serving.retrieval import not_covered_line, retrieve_scored, weak_match_line

HEADERS = ["#", "title", "document", "score", "covers", "BM25", "similarity", "latent", "passage"]
PASSAGE_CHARS = 200


def search(db: sqlite_utils.Database, question: str, *, k: int = 5, team: str | None = None) -> tuple[list[list], str]:
    """(table rows, a line under the table) for `question`, as a question of `team` gets them (store.teams: the
    shared and the team's passages; None: as no team, shared passages only)."""
    question = (question or "").strip()
    if not question:
        return [], "Type a question, as an employee would ask it."
    results = retrieve_scored(db, question, k=k, team=team)
    if not results:
        return [], not_covered_line(question)
    rows = []
    for rank, hit in enumerate(results, 1):
        evidence = hit.evidence()
        text = " ".join(hit.passage.content.split())
        rows.append([rank, hit.passage.title, f"{hit.passage.doc_path} #{hit.passage.chunk_index}",
                     round(hit.score, 3), "yes" if hit.matches else "no", evidence["bm25"], evidence["similarity"],
                     evidence["latent"], text[:PASSAGE_CHARS] + ("…" if len(text) > PASSAGE_CHARS else "")])
    covering = sum(hit.matches for hit in results)
    line = (f"{len(rows)} passage(s), best first; {covering} alone make the knowledge base cover the question "
            "(covers: yes). The bot answers from the first ones.")
    weak = weak_match_line(results)
    return rows, f"{line} {weak}" if weak else line

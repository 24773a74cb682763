"""Dataset tab handlers: the examples themselves, import, export, statistics and growth."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
import sqlite_utils

from playground.auth import Viewer
from playground.review import Outcome
from playground.safety import describe, find_sensitive
from store import StoreError
from store.examples import (
    STATUSES,
    example_stats,
    examples_growth_by_source,
    get_example,
    list_examples,
    review_example,
    update_example,
)
from store.export import EXPORT_FORMATS, write_export
from store.formats import ImportFileError, import_examples
from store.interactions import feedback_stats

TABLE_COLUMNS = ["id", "question", "answer", "source", "reviewer", "reviewed_at", "team"]


def examples_table(db: sqlite_utils.Database, *, search: str = "", status: str = "approved", limit: int = 500,
                   team: str | None = None) -> pd.DataFrame:
    """The examples (approved by default) matching `search`, newest first. `team`: only that team's
    (store.teams.SHARED: the shared ones); None or "": every team's. The team column is empty for shared ones."""
    status = status if status in STATUSES else None
    rows = list_examples(db, status=status, search=search.strip() or None, team=team or None)
    rows = sorted(rows, key=lambda e: e.id, reverse=True)[:limit]
    return pd.DataFrame([{"id": e.id, "question": e.question, "answer": e.answer, "source": e.source,
                          "reviewer": e.reviewer or "", "reviewed_at": (e.reviewed_at or "")[:19],
                          "team": e.team or ""} for e in rows],
                        columns=TABLE_COLUMNS)


def load_example(db: sqlite_utils.Database, example_id: int | str) -> tuple[int, str, str, str]:
    ex = get_example(db, int(example_id))
    return ex.id, ex.question, ex.input, ex.answer


def save_example(db: sqlite_utils.Database, viewer: Viewer, example_id: int | str | None, *, question: str,
                 answer: str, input: str = "", confirm: bool = False) -> Outcome:
    """Edit an example in place (the curator's name is recorded as its reviewer)."""
    if example_id in (None, ""):
        return Outcome(False, "Not saved: pick an example from the table first")
    question, answer = (question or "").strip(), (answer or "").strip()
    if not question or not answer:
        return Outcome(False, "Not saved: the question and the answer must not be empty")
    found = find_sensitive(answer) + find_sensitive(question)
    if found and not confirm:
        return Outcome(False, f"Not saved: it contains {describe(found)}: redact it, or tick “save anyway”")
    try:
        ex = get_example(db, int(example_id))
        update_example(db, ex.id, question=question, answer=answer, input=(input or "").strip())
        if ex.status == "approved":  # record who last vouched for it (and that they confirmed any flags)
            review_example(db, ex.id, decision="approved", reviewer=viewer.name, sensitive_ok=confirm)
    except StoreError as exc:
        msg = str(exc)
        if "UNIQUE" in msg:
            msg = f"another example already asks {question!r}; merge them in the review tab"
        return Outcome(False, f"Not saved: {msg}")
    except Exception as exc:  # sqlite3.IntegrityError from the unique question index
        if "UNIQUE" in str(exc):
            return Outcome(False, f"Not saved: another example already asks {question!r}")
        raise
    return Outcome(True, f"Saved example #{ex.id}.", ex.id)


def remove_example(db: sqlite_utils.Database, viewer: Viewer, example_id: int | str | None) -> Outcome:
    """Take an example out of the training data (rejected, kept for the record)."""
    if example_id in (None, ""):
        return Outcome(False, "Not removed: pick an example from the table first")
    try:
        review_example(db, int(example_id), decision="rejected", reviewer=viewer.name, note="removed from the dataset")
    except StoreError as exc:
        return Outcome(False, f"Not removed: {exc}")
    return Outcome(True, f"Example #{example_id} removed from the training data (rejected).")


def import_file(db: sqlite_utils.Database, viewer: Viewer, path: str | Path | None, *, display_name: str | None = None,
                status: str = "approved") -> Outcome:
    """Import a JSONL / JSON array / CSV / Excel file with the CLI's validation and scan: a file with any bad line is refused whole, and
    so is a file with rows holding secrets or personal data when importing as approved (as pending, they wait in
    review with the flag shown)."""
    if not path:
        return Outcome(False, "Nothing imported: choose a .jsonl, .json, .csv or .xlsx file first")
    if status not in ("approved", "pending"):
        return Outcome(False, f"Nothing imported: status must be approved or pending, not {status!r}")
    path = Path(path)
    name = display_name or path.name
    try:
        result = import_examples(db, path, status=status, reviewer=viewer.name)
    except StoreError as exc:
        # Uploads live under a temporary name; report FILE:LINE with the name the curator knows.
        lines = str(exc).replace(str(path), name).splitlines()
        head = f"Nothing imported: {len(lines)} problem(s)" if isinstance(exc, ImportFileError) else "Nothing imported"
        return Outcome(False, head + "\n" + "\n".join(lines))
    message = result.summary(name)
    if result.other_answers:
        message += "\n" + "\n".join(line.replace(str(path), name) for line in result.other_answers)
    if result.held:
        message += f"\n{len(result.held)} row(s) hold secrets or personal data: review them before approving.\n"
        message += "\n".join(line.replace(str(path), name) for line in result.held)
    if result.notices:
        message += "\n" + "\n".join(line.replace(str(path), name) for line in result.notices)
    return Outcome(True, message)


def export_file(db: sqlite_utils.Database, fmt: str, *, out_dir: str | Path | None = None) -> tuple[str, Outcome]:
    """Write the export in `fmt` to a file for download; returns (path, outcome)."""
    if fmt not in EXPORT_FORMATS:
        return "", Outcome(False, f"unknown format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}")
    out_dir = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="kbloop-export-"))
    out = out_dir / f"kbloop-{fmt}.jsonl"
    n, left_out = write_export(db, fmt, out)
    note = (f" {left_out} left out: they hold secrets or personal data that no curator confirmed." if left_out else "")
    return str(out), Outcome(True, f"{n} {fmt} records written to {out.name}.{note}")


def stats_markdown(db: sqlite_utils.Database) -> str:
    ex, fb = example_stats(db), feedback_stats(db)
    return (
        "| examples | approved | pending | rejected | answers | 👍 | 👎 | corrections |\n|---|---|---|---|---|---|---|---|\n"
        f"| {sum(ex['by_status'].values())} | {ex['by_status']['approved']} | {ex['by_status']['pending']} | "
        f"{ex['by_status']['rejected']} | {fb['interactions']} | {fb['up']} | {fb['down']} | {fb['corrections']} |"
    )


def growth_frame(db: sqlite_utils.Database) -> pd.DataFrame:
    """Cumulative approved examples per day and source (a line per source, plus the total)."""
    rows = examples_growth_by_source(db)
    if not rows:
        return pd.DataFrame({"day": pd.Series(dtype="datetime64[ns]"), "examples": pd.Series(dtype="int64"),
                             "source": pd.Series(dtype="str")})
    df = pd.DataFrame(rows, columns=["day", "source", "n"])
    wide = df.pivot_table(index="day", columns="source", values="n", aggfunc="sum", fill_value=0).sort_index().cumsum()
    wide["total"] = wide.sum(axis=1)
    long = wide.reset_index().melt(id_vars="day", var_name="source", value_name="examples")
    long["day"] = pd.to_datetime(long["day"])
    long["examples"] = long["examples"].astype("int64")
    return long[["day", "examples", "source"]]


def composition_frame(db: sqlite_utils.Database) -> pd.DataFrame:
    """Examples by status and source, for a bar plot."""
    stats = example_stats(db)
    rows = [{"group": f"status: {k}", "count": v} for k, v in stats["by_status"].items()]
    rows += [{"group": f"source: {k}", "count": v} for k, v in stats["by_source"].items()]
    return pd.DataFrame(rows, columns=["group", "count"])

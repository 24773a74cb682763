"""Training-data export: the approved examples, the votes and the approved corrections as JSONL in the formats TRL
and LLaMA-Factory read (`kbloop data export --format sft|messages|dpo|kto`, the playground's Dataset tab).
"""

from __future__ import annotations

import json
from pathlib import Path

import sqlite_utils

from store.db import StoreError
from store.examples import training_examples
from store.files import atomic_path
from store.preferences import labelled_answers, preference_pairs
from store.teams import require_team

EXPORT_FORMATS = ("sft", "messages", "dpo", "kto")
# Column sets the TRL trainers read (SFT "prompt-completion"/conversational, DPO, KTO); LLaMA-Factory's
# alpaca format is the sft one.
EXPORT_COLUMNS = {
    "sft": ["instruction", "input", "output"],
    "messages": ["messages"],
    "dpo": ["prompt", "chosen", "rejected"],
    "kto": ["prompt", "completion", "label"],
}


def export_records(db: sqlite_utils.Database, fmt: str, *, team: str | None = None) -> tuple[list[dict], int]:
    """(records, how many were left out because the scan flagged them and nobody confirmed them). `team`: what
    trains that team's adapter, the shared and the team's rows (store.teams); None: the shared adapter's."""
    if fmt not in EXPORT_FORMATS:
        raise StoreError(f"unknown export format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}")
    if fmt == "dpo":
        return preference_pairs(db, team=team)
    if fmt == "kto":
        return labelled_answers(db, team=team)
    examples, withheld = training_examples(db, team=team)
    if fmt == "sft":
        return [{"instruction": e.question, "input": e.input, "output": e.answer} for e in examples], len(withheld)
    return [{"messages": [
        {"role": "user", "content": e.question + (f"\n\n{e.input}" if e.input else "")},
        {"role": "assistant", "content": e.answer},
    ]} for e in examples], len(withheld)


def write_export(db: sqlite_utils.Database, fmt: str, out: Path | str, *, team: str | None = None) -> tuple[int, int]:
    """Write `fmt` records as JSONL to `out` (`team`: export_records); returns (written, left out as flagged)."""
    require_team(db, team)
    records, left_out = export_records(db, fmt, team=team)
    write_jsonl(out, records)
    return len(records), left_out


def write_jsonl(out: Path | str, records: list[dict]) -> None:
    """One JSON record a line, UTF-8 as written (Chinese stays readable), replacing `out` whole."""
    with atomic_path(out) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")

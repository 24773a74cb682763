"""Training-data files: validated import (JSONL / CSV) and export in TRL / LLaMA-Factory formats.

Import accepts, per line or row: `instruction`/`input`/`output` (the seed's format), `question`/`answer`,
or `messages` ([{role, content}…], one user turn and one assistant answer; a system turn is allowed).
A file with any bad line is refused whole: every problem is reported as `FILE:LINE: reason`.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import sqlite_utils

from store.db import StoreError
from store.examples import NewExample, list_examples
from store.interactions import labelled_answers, preference_pairs

EXPORT_FORMATS = ("sft", "messages", "dpo", "kto")
# Column sets the TRL trainers read (SFT "prompt-completion"/conversational, DPO, KTO); LLaMA-Factory's
# alpaca format is the sft one.
EXPORT_COLUMNS = {
    "sft": ["instruction", "input", "output"],
    "messages": ["messages"],
    "dpo": ["prompt", "chosen", "rejected"],
    "kto": ["prompt", "completion", "label"],
}


class ImportFileError(StoreError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def _text_field(obj: dict, key: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"`{key}` must be text, got {type(value).__name__}")
    return value.strip()


def example_from_record(obj: object) -> NewExample:
    """One record in any accepted shape -> NewExample; ValueError says what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("`messages` must be a list of {role, content} objects")
        users = [m for m in messages if m.get("role") == "user"]
        assistants = [m for m in messages if m.get("role") == "assistant"]
        unknown = {m.get("role") for m in messages} - {"system", "user", "assistant"}
        if unknown:
            raise ValueError(f"unknown role(s) in `messages`: {', '.join(map(str, unknown))}")
        if len(users) != 1 or len(assistants) != 1:
            raise ValueError("`messages` must hold exactly one user turn and one assistant turn")
        question, answer = _text_field(users[0], "content"), _text_field(assistants[0], "content")
        if not question:
            raise ValueError("the user turn is empty")
        if not answer:
            raise ValueError("the assistant turn is empty")
        return NewExample(question=question, answer=answer)
    if "instruction" in obj or "output" in obj:
        question, inp, answer = _text_field(obj, "instruction"), _text_field(obj, "input") or "", _text_field(obj, "output")
        if not question:
            raise ValueError("missing or empty `instruction`")
        if not answer:
            raise ValueError("missing or empty `output`")
        return NewExample(question=question, input=inp, answer=answer)
    if "question" in obj or "answer" in obj:
        question, answer = _text_field(obj, "question"), _text_field(obj, "answer")
        if not question:
            raise ValueError("missing or empty `question`")
        if not answer:
            raise ValueError("missing or empty `answer`")
        return NewExample(question=question, input=_text_field(obj, "input") or "", answer=answer)
    keys = ", ".join(sorted(obj)) or "none"
    raise ValueError(f"unknown format (fields: {keys}); expected instruction/input/output, question/answer or messages")


def read_examples_file(path: Path | str) -> list[NewExample]:
    """Parse and validate a whole file; raise ImportFileError listing every bad line."""
    path = Path(path)
    raw = _read_text(path)
    suffix = path.suffix.lower()
    records: list[tuple[int, object]] = []
    problems: list[str] = []
    if suffix in (".jsonl", ".json", ".ndjson"):
        for lineno, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                problems.append(f"{path}:{lineno}: broken JSON ({exc.msg} at column {exc.colno})")
    elif suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(raw), delimiter="\t" if suffix == ".tsv" else ",")
        if not reader.fieldnames:
            raise ImportFileError([f"{path}:1: no header row"])
        for row in reader:
            # DictReader's line_num is the physical line where the row ended (quoted fields can span lines).
            if None in row:
                problems.append(f"{path}:{reader.line_num}: more fields than the header has")
                continue
            records.append((reader.line_num, {k.strip(): v for k, v in row.items() if k and v is not None}))
    else:
        raise ImportFileError([f"{path}: unknown file type {suffix or '(none)'}; expected .jsonl or .csv"])
    examples: list[NewExample] = []
    for lineno, obj in records:
        try:
            examples.append(example_from_record(obj))
        except ValueError as exc:
            problems.append(f"{path}:{lineno}: {exc}")
    if problems:
        problems.sort(key=lambda p: int(p.split(":")[1]) if p.split(":")[1].isdigit() else 0)
        raise ImportFileError(problems)
    if not examples:
        raise ImportFileError([f"{path}: no examples in the file"])
    return examples


def _read_text(path: Path) -> str:
    if not path.exists():
        raise StoreError(f"{path}: no such file")
    if path.is_dir():
        raise StoreError(f"{path}: is a folder, expected a file")
    try:
        data = path.read_bytes()
    except PermissionError:
        raise StoreError(f"{path}: not readable (permission denied)") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise StoreError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8") from None


def export_records(db: sqlite_utils.Database, fmt: str) -> list[dict]:
    if fmt not in EXPORT_FORMATS:
        raise StoreError(f"unknown export format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}")
    if fmt == "dpo":
        return preference_pairs(db)
    if fmt == "kto":
        return labelled_answers(db)
    examples = list_examples(db, status="approved")
    if fmt == "sft":
        return [{"instruction": e.question, "input": e.input, "output": e.answer} for e in examples]
    return [{"messages": [
        {"role": "user", "content": e.question + (f"\n\n{e.input}" if e.input else "")},
        {"role": "assistant", "content": e.answer},
    ]} for e in examples]


def write_export(db: sqlite_utils.Database, fmt: str, out: Path | str) -> int:
    records = export_records(db, fmt)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    with tmp.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    tmp.replace(out)
    return len(records)

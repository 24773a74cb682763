"""Training-data files: validated import (JSONL / CSV) and export in TRL / LLaMA-Factory formats.

Import accepts, per line or row: `instruction`/`input`/`output`, `question`/`answer`, or `messages`
([{role, content}…], one user turn and one assistant answer; a system turn is allowed), or any two columns named
with `question_field` / `answer_field`. `instruction`/`input`/`output` comes in two layouts, told apart per file:
Alpaca's (the instruction is the question, `input` optional context) and the LoRA guide's (one fixed preamble as
the instruction on every row, the employee's question in `input`). A file with any bad line is refused whole:
every problem is reported as `FILE:LINE: reason`.
"""

from __future__ import annotations

import csv
import io
import json
import unicodedata
from collections import Counter
from dataclasses import dataclass
from functools import partial
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

# How each kind of row is read, as `kbloop data import` reports it.
READ_AS = {
    "alpaca": "question = instruction, context = input (Alpaca layout)",
    "question/answer": "question = question, answer = answer",
    "messages": "question = the user turn, answer = the assistant turn (messages)",
}


class ImportFileError(StoreError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class ImportedFile:
    """A validated training-data file: its examples, and how it was read (for the user to check)."""

    examples: list[NewExample]
    layout: str  # "alpaca", "guide", "question/answer", "messages", "fields" (named by the caller) or "mixed"
    description: str


def _text_field(obj: dict, key: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"`{key}` must be text, got {type(value).__name__}")
    return value.strip()


def _preamble_key(text: str) -> str:
    # A preamble retyped by hand differs in spacing or in full- and half-width punctuation ("：" / ":").
    return unicodedata.normalize("NFKC", " ".join(text.split()))


def _shared_preamble(records: list[object]) -> str | None:
    """The guide layout's preamble, if the file has one: the instruction shared by more than half of the
    instruction/input/output rows (and by at least 2), most of which carry the question in `input`. One instruction
    on every row with no `input` is Alpaca with duplicate questions (dedup's business), not a preamble."""
    rows = [(_preamble_key(r["instruction"]), r) for r in records
            if isinstance(r, dict) and "messages" not in r and isinstance(r.get("instruction"), str)]
    if not rows:
        return None
    key, _ = Counter(k for k, _ in rows).most_common(1)[0]
    sharing = [r for k, r in rows if k == key]
    with_input = sum(1 for r in sharing if isinstance(r.get("input"), str) and r["input"].strip())
    if key and len(sharing) >= 2 and len(sharing) * 2 > len(rows) and with_input * 2 > len(sharing):
        return sharing[0]["instruction"].strip()
    return None


def example_from_record(obj: object, *, preamble: str | None = None) -> tuple[str, NewExample]:
    """One record in any accepted shape -> (its kind, see READ_AS, or "guide"; the example). ValueError says what
    is wrong. `preamble` is the file's shared instruction (guide layout): its rows ask the question in `input`."""
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
        return "messages", NewExample(question=question, answer=answer)
    if "instruction" in obj or "output" in obj:
        instruction, answer = _text_field(obj, "instruction"), _text_field(obj, "output")
        inp = _text_field(obj, "input") or ""
        if not instruction:
            raise ValueError("missing or empty `instruction`")
        if not answer:
            raise ValueError("missing or empty `output`")
        if preamble is not None and _preamble_key(instruction) == _preamble_key(preamble):
            if not inp:
                raise ValueError(f'empty `input`: rows with the shared instruction "{preamble}" ask their question '
                                 "there")
            # The preamble is dropped: an employee's bare question is what the model gets when it answers.
            return "guide", NewExample(question=inp, answer=answer)
        return "alpaca", NewExample(question=instruction, input=inp, answer=answer)
    if "question" in obj or "answer" in obj:
        question, answer = _text_field(obj, "question"), _text_field(obj, "answer")
        if not question:
            raise ValueError("missing or empty `question`")
        if not answer:
            raise ValueError("missing or empty `answer`")
        return "question/answer", NewExample(question=question, input=_text_field(obj, "input") or "", answer=answer)
    keys = ", ".join(sorted(obj)) or "none"
    raise ValueError(f"unknown format (fields: {keys}); expected instruction/input/output, question/answer or messages"
                     " (or name the columns: `kbloop data import --question-field … --answer-field …`)")


def read_examples_file(path: Path | str, *, question_field: str | None = None,
                       answer_field: str | None = None) -> ImportedFile:
    """Parse and validate a whole file; raise ImportFileError listing every bad line.

    `question_field` / `answer_field` name the columns to read instead of detecting the format (either one alone:
    the other is the usual name, `instruction`/`question` or `output`/`answer`); `input` stays context unless it
    is one of them.
    """
    path = Path(path)
    records, problems = _read_records(path)
    preamble, fields = None, None
    if question_field or answer_field:
        read, fields = _field_reader(path, [obj for _, obj in records], question_field, answer_field)
    else:
        preamble = _shared_preamble([obj for _, obj in records])
        read = partial(example_from_record, preamble=preamble)
    examples: list[NewExample] = []
    kinds: Counter[str] = Counter()
    for lineno, obj in records:
        try:
            kind, example = read(obj)
        except ValueError as exc:
            problems.append(f"{path}:{lineno}: {exc}")
            continue
        kinds[kind] += 1
        examples.append(example)
    if problems:
        problems.sort(key=lambda p: int(p.split(":")[1]) if p.split(":")[1].isdigit() else 0)
        raise ImportFileError(problems)
    if not examples:
        raise ImportFileError([f"{path}: no examples in the file"])
    return ImportedFile(examples, *_describe(kinds, preamble=preamble, fields=fields))


def _field_reader(path: Path, records: list[object], question_field: str | None, answer_field: str | None):
    """(a reader of one record, its description) for the columns the caller named."""
    present = {key for obj in records if isinstance(obj, dict) for key in obj}
    q = question_field or next((f for f in ("instruction", "question") if f in present), "instruction")
    a = answer_field or next((f for f in ("output", "answer") if f in present), "output")
    problems = [f"{path}: no field `{f}` in the file (fields: {', '.join(sorted(present)) or 'none'})"
                for f in dict.fromkeys((q, a)) if f not in present]
    if q == a:
        problems.append(f"{path}: `{q}` cannot be both the question and the answer")
    if problems and records:  # an empty file is reported as such by the caller
        raise ImportFileError(problems)
    context = "input" if "input" in present and "input" not in (q, a) else None

    def read(obj: object) -> tuple[str, NewExample]:
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        question, answer = _text_field(obj, q), _text_field(obj, a)
        if not question:
            raise ValueError(f"missing or empty `{q}`")
        if not answer:
            raise ValueError(f"missing or empty `{a}`")
        return "fields", NewExample(question=question, input=(_text_field(obj, context) or "") if context else "",
                                    answer=answer)

    return read, f"question = {q}, answer = {a}" + (", context = input" if context else "")


def _describe(kinds: Counter[str], *, preamble: str | None, fields: str | None) -> tuple[str, str]:
    """(layout, description) of a file whose rows were read as `kinds` (a count per kind)."""
    total = sum(kinds.values())
    if fields is not None:
        return "fields", fields
    if "guide" in kinds:
        where = "every row" if kinds["guide"] == total else f"{kinds['guide']} of {total} rows"
        parts = [f'question = input; the instruction is the same on {where}: "{preamble}"']
        parts += [f"{n} {'row' if n == 1 else 'rows'} with another {'instruction' if k == 'alpaca' else 'format'} "
                  f"read as {READ_AS[k]}" for k, n in kinds.items() if k != "guide"]
        return "guide", "; ".join(parts)
    if len(kinds) == 1:
        (kind,) = kinds
        return kind, READ_AS[kind]
    return "mixed", "; ".join(f"{n} {'row' if n == 1 else 'rows'} read as {READ_AS[k]}" for k, n in kinds.items())


def _read_records(path: Path) -> tuple[list[tuple[int, object]], list[str]]:
    """(line number, record) for each line or row, and `FILE:LINE: reason` for each one that does not parse."""
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
    return records, problems


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

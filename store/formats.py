"""Training-data files: validated import (JSONL, a JSON array of records, CSV, Excel). Export is store.export.

Import accepts, per record (a line, an element of the array, or a row): `instruction`/`input`/`output`,
`question`/`answer`, `messages` ([{role, content}…], one user turn and one assistant answer; a system turn is
allowed) or ShareGPT's `conversations` ([{from: human|gpt|system, value}…], the same rule), `prompt`/`completion`,
`query`/`response` or `问题`/`答案` (field names in any case), or any two columns named with `question_field` /
`answer_field`. `instruction`/`input`/`output` comes in two layouts, told apart per file:
Alpaca's (the instruction is the question, `input` optional context) and the LoRA guide's (one fixed preamble as
the instruction on every row, the employee's question in `input`). A file with any bad line is refused whole:
every problem is reported as `FILE:LINE: reason`, including a text over its limit (store.examples.MAX_QUESTION_CHARS,
MAX_INPUT_CHARS, MAX_ANSWER_CHARS), a NUL character, a repeated CSV column and JSON nested too deeply to read.
`import_examples` also scans every row for secrets and personal data (store.sensitive): a file with flagged rows is
refused whole as approved, or its flagged rows are held as pending with the flag shown in review.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import unicodedata
import zipfile
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import sqlite_utils

from store.db import StoreError
from store.examples import (
    MAX_ANSWER_CHARS,
    MAX_INPUT_CHARS,
    MAX_QUESTION_CHARS,
    NewExample,
    add_examples,
    example_hash,
    example_problems,
)
from store.sensitive import describe, find_sensitive_in
from store.teams import require_team
from store.text import count, decode_text, normalize

# The longest CSV field read at all: the largest text an example may hold, with room for quoting. Python's csv
# stops at 128 KiB by default with an exception that names no line.
_MAX_CSV_FIELD = max(MAX_QUESTION_CHARS, MAX_INPUT_CHARS, MAX_ANSWER_CHARS) * 2

# How each kind of row is read, as `kbloop data import` reports it.
READ_AS = {
    "alpaca": "question = instruction, context = input (Alpaca layout)",
    "question/answer": "question = question, answer = answer",
    "messages": "question = the user turn, answer = the assistant turn (messages)",
    "sharegpt": "question = the human turn, answer = the gpt turn (ShareGPT conversations)",
}
# Other names for a question and its answer, in the order they are looked for: TRL's prompt-completion datasets,
# ms-swift's query/response, a Chinese spreadsheet's 问题/答案. Field names are matched whatever their case
# ("Question" from a spreadsheet's header row).
_QA_FIELDS = (("question", "answer"), ("prompt", "completion"), ("query", "response"), ("问题", "答案"))
READ_AS.update({f"{q}/{a}": f"question = {q}, answer = {a}" for q, a in _QA_FIELDS[1:]})


class ImportFileError(StoreError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class ImportedFile:
    """A validated training-data file: its examples, and how it was read (for the user to check)."""

    examples: list[NewExample]
    layout: str  # "alpaca", "guide", "question/answer" (or another pair of _QA_FIELDS), "messages", "sharegpt",
    # "fields" (named by the caller) or "mixed"
    description: str
    lines: tuple[int, ...] = ()  # the line (or CSV row end) each example was read from


@dataclass(frozen=True)
class ImportResult:
    added: int
    duplicates: int
    description: str  # how the file was read
    status: str  # what the examples were added as
    held: tuple[str, ...] = ()  # `FILE:LINE: reason` of rows held as pending because the scan flagged them
    notices: tuple[str, ...] = ()  # `FILE:LINE: …` of contact details imported (shown, not refused)
    # `FILE:LINE: …` of rows not added because their question already has another answer (of the duplicates)
    other_answers: tuple[str, ...] = ()

    def summary(self, name: str, team: str | None = None) -> str:
        """What the CLI and the playground say first: how many were added, as what, and how the file was read."""
        same = self.duplicates - len(self.other_answers)
        n = len(self.other_answers)
        other = (f", {n} not added because {'its' if n == 1 else 'their'} question already has another answer "
                 "(below)" if n else "")
        return (f"{name}: {count(self.added, 'example')} imported as {self.status}"
                f"{f' for team {team}' if team else ''}, {count(same, 'duplicate')} skipped{other}."
                f"\nRead as: {self.description}")


def _text_field(obj: dict, key: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # "answer": 25, as a spreadsheet's number cell is read
    if not isinstance(value, str):
        raise ValueError(f"`{key}` must be text, got {type(value).__name__}")
    if "\x00" in value:
        raise ValueError(f"`{key}` contains a NUL character (\\u0000)")
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


_CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
# LLaMA-Factory's sharegpt layout: `from` human / gpt (system, when the system prompt is a turn); `role` / `content`
# turns in a `conversations` list are read too, as some exports write them.
_SHAREGPT_ROLES = {**_CHAT_ROLES, "human": "user", "gpt": "assistant"}


def _one_exchange(turns: object, field: str, role_key: str, text_key: str, roles: dict[str, str]) -> NewExample:
    """The question and answer of a chat record that holds one user turn and one assistant turn (a system turn
    allowed); ValueError names what is wrong."""
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise ValueError(f"`{field}` must be a list of {{{role_key}, {text_key}}} objects")
    if field == "conversations" and turns and all("role" in t and "from" not in t for t in turns):
        role_key, text_key = "role", "content"
    if any(role_key not in t for t in turns):
        raise ValueError(f"a turn in `{field}` has no `{role_key}`")
    unknown = sorted({r if isinstance(r, str) else repr(r) for t in turns
                      if not isinstance(r := t[role_key], str) or r not in roles})
    if unknown:
        raise ValueError(f"unknown role(s) in `{field}`: {', '.join(unknown)}")
    users = [t for t in turns if roles[t[role_key]] == "user"]
    assistants = [t for t in turns if roles[t[role_key]] == "assistant"]
    if len(users) != 1 or len(assistants) != 1:
        raise ValueError(f"`{field}` must hold exactly one user turn and one assistant turn (kbloop trains "
                         f"single questions; this one has {len(users)} and {len(assistants)})")
    question, answer = _text_field(users[0], text_key), _text_field(assistants[0], text_key)
    if not question:
        raise ValueError("the user turn is empty")
    if not answer:
        raise ValueError("the assistant turn is empty")
    return NewExample(question=question, answer=answer)


def _refuse_history(obj: dict) -> None:
    """LLaMA-Factory's Alpaca layout and ms-swift's query/response may carry earlier turns in `history`. A follow-up
    ("What about weekends?") trained without them would teach an answer to a question it does not ask."""
    history = obj.get("history")
    if history in (None, "", []):
        return
    turns = count(len(history), "earlier turn") if isinstance(history, list) else "turns"
    raise ValueError(f"`history` holds {turns}: kbloop trains single questions, and this one read alone may not "
                     "ask what its answer answers (put what it needs into the question, or leave the row out)")


def example_from_record(obj: object, *, preamble: str | None = None) -> tuple[str, NewExample]:
    """One record in any accepted shape -> (its kind, see READ_AS, or "guide"; the example). ValueError says what
    is wrong. `preamble` is the file's shared instruction (guide layout): its rows ask the question in `input`."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    _refuse_history(obj)
    if "messages" in obj:
        return "messages", _one_exchange(obj["messages"], "messages", "role", "content", _CHAT_ROLES)
    if "conversations" in obj:
        return "sharegpt", _one_exchange(obj["conversations"], "conversations", "from", "value", _SHAREGPT_ROLES)
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
    # A pair whose both names are there; else question/answer, so that a row missing its answer says so.
    q, a = next(((q, a) for q, a in _QA_FIELDS if q in obj and a in obj), ("question", "answer"))
    if q in obj or a in obj:
        question, answer = _text_field(obj, q), _text_field(obj, a)
        if not question:
            raise ValueError(f"missing or empty `{q}`")
        if not answer:
            raise ValueError(f"missing or empty `{a}`")
        context = (_text_field(obj, "input") or "") if q == "question" else ""
        return f"{q}/{a}", NewExample(question=question, input=context, answer=answer)
    keys = ", ".join(sorted(obj)) or "none"
    raise ValueError(f"unknown format (fields: {keys}); expected instruction/input/output, question/answer "
                     "(prompt/completion, query/response, 问题/答案), messages or conversations"
                     " (or name the columns: `kbloop data import --question-field … --answer-field …`)")


def read_examples_file(path: Path | str, *, question_field: str | None = None,
                       answer_field: str | None = None) -> ImportedFile:
    """Parse and validate a whole file; raise ImportFileError listing every bad line.

    `question_field` / `answer_field` name the columns to read instead of detecting the format (either one alone:
    the other is the usual name, `instruction`/`question` or `output`/`answer`); `input` stays context unless it
    is one of them.
    """
    path = Path(path)
    records, problems, notes = _read_records(path)
    preamble, fields = None, None
    if question_field or answer_field:
        read, fields = _field_reader(path, [obj for _, obj in records], question_field, answer_field)
    else:
        records = _with_lowercase_fields(path, records, problems)
        preamble = _shared_preamble([obj for _, obj in records])
        read = partial(example_from_record, preamble=preamble)
    examples: list[NewExample] = []
    lines: list[int] = []
    kinds: Counter[str] = Counter()
    # A JSON array written on one line puts every record on line 1: there, a problem also names the record.
    per_line = Counter(lineno for lineno, _ in records)
    for number, (lineno, obj) in enumerate(records, start=1):
        where = f"{path}:{lineno}: record {number}" if per_line[lineno] > 1 else f"{path}:{lineno}"
        try:
            kind, example = read(obj)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        too_big = example_problems(example.question, example.answer, example.input)
        if too_big:
            problems += [f"{where}: {p}" for p in too_big]
            continue
        kinds[kind] += 1
        examples.append(example)
        lines.append(lineno)
    if problems:
        problems.sort(key=_problem_line)
        raise ImportFileError(problems)
    if not examples:
        raise ImportFileError([f"{path}: no examples in the file"])
    layout, description = _describe(kinds, preamble=preamble, fields=fields)
    with_system = sum(1 for _, obj in records if _has_system_prompt(obj))
    if with_system:
        notes.append(f"`system` of {count(with_system, 'row')} not used: the bot answers with kbloop's system prompt, and "
                     "training uses the same")
    description += "".join(f" ({note})" for note in notes)
    return ImportedFile(examples, layout, description, lines=tuple(lines))


def _with_lowercase_fields(path: Path, records: list[tuple[int, object]],
                           problems: list[str]) -> list[tuple[int, object]]:
    """The records with their field names in lower case, so that a header row's "Question" or "Instruction" is
    read; a record whose names differ only in case ("Question" and "question") is a problem, not a guess."""
    out, clashes = [], set()
    for lineno, obj in records:
        if isinstance(obj, dict) and any(isinstance(k, str) and k != k.strip().lower() for k in obj):
            lowered: dict = {}
            for key, value in obj.items():
                name = key.strip().lower() if isinstance(key, str) else key
                if name in lowered:
                    if name not in clashes:  # once per name: a CSV header would repeat it on every row
                        problems.append(f"{path}:{lineno}: fields that differ only in case or spaces ({name!r} "
                                        "twice); keep one")
                    clashes.add(name)
                    break
                lowered[name] = value
            else:
                out.append((lineno, lowered))
            continue
        out.append((lineno, obj))
    return out


def _problem_line(problem: str) -> int:
    # `FILE:LINE: reason`; a file name may hold colons itself, so the line is the last number before ": ".
    head = problem.split(": ", 1)[0]
    tail = head.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def scan_imported(path: Path | str, imported: ImportedFile) -> tuple[list[str], list[str]]:
    """(`FILE:LINE: contains …` for rows holding secrets or identity or payment numbers, the same for rows holding
    only contact details)."""
    flagged, notices = [], []
    for lineno, ex in zip(imported.lines, imported.examples):
        found = find_sensitive_in(ex.question, ex.input, ex.answer)
        blocking = [f for f in found if f.blocks]
        if blocking:
            flagged.append(f"{path}:{lineno}: contains {describe(blocking)}")
        elif found:
            notices.append(f"{path}:{lineno}: contact details {describe(found)}")
    return flagged, notices


def import_examples(db: sqlite_utils.Database, path: Path | str, *, status: str = "approved", reviewer: str | None = None,
                    question_field: str | None = None, answer_field: str | None = None,
                    team: str | None = None) -> ImportResult:
    """Read, validate and scan a file, then add its examples in one transaction (the CLI's and the playground's import).
    `team`: the examples belong to that team (it must exist; store.teams), None: shared.

    Rows whose texts hold secrets or identity or payment numbers are never approved silently: importing as approved,
    the file is refused whole with `FILE:LINE: reason` for each; importing as pending, they are held for review,
    where the flag is shown. Contact details (e-mail addresses, phone numbers) are imported and listed.
    """
    if status not in ("approved", "pending"):
        raise StoreError(f"status must be approved or pending, not {status!r}")
    require_team(db, team)  # before reading: a misspelt team is the first thing to say
    imported = read_examples_file(path, question_field=question_field, answer_field=answer_field)
    flagged, notices = scan_imported(path, imported)
    if flagged and status == "approved":
        raise ImportFileError(flagged + [f"{path}: nothing imported: {len(flagged)} row(s) hold secrets or personal "
                                         "data; redact them, or import with --status pending to review them"])
    other_answers = _other_answers(db, path, imported, team=team)
    added, dupes = add_examples(db, imported.examples, status=status, source="import",
                                reviewer=reviewer if status == "approved" else None, team=team)
    return ImportResult(added, dupes, imported.description, status, held=tuple(flagged), notices=tuple(notices),
                        other_answers=tuple(other_answers))


def _other_answers(db: sqlite_utils.Database, path: Path | str, imported: ImportedFile, *,
                   team: str | None) -> list[str]:
    """`FILE:LINE: …` for each row whose question (with its context) is already there, in the store or earlier
    in the file, with another answer: such a row is skipped as a duplicate, and an updated answer in a re-imported
    file must not vanish unsaid. Which answer is right is a curator's call: the message says how to change it."""
    hashes = [example_hash(ex.question, ex.input, team) for ex in imported.examples]
    unique = sorted(set(hashes))
    stored = {}
    for i in range(0, len(unique), 500):  # SQLite caps the parameters of one statement
        batch = unique[i:i + 500]
        stored.update({row[0]: row[1:] for row in db.execute(
            f"SELECT content_hash, id, answer, status FROM examples WHERE content_hash IN ({','.join('?' * len(batch))})",
            batch).fetchall()})
    first: dict[str, tuple[int, str]] = {}
    out = []
    for ex, h, line in zip(imported.examples, hashes, imported.lines):
        if h in stored and normalize(stored[h][1]) != normalize(ex.answer):
            ex_id, _, ex_status = stored[h]
            out.append(f"{path}:{line}: example #{ex_id} ({ex_status}) already holds this question with another "
                       f"answer; kept (`kbloop review approve {ex_id} --answer …` or the playground's Review tab "
                       "changes it)")
        elif h not in stored and h in first and normalize(first[h][1]) != normalize(ex.answer):
            out.append(f"{path}:{line}: the same question as line {first[h][0]} with another answer; the first "
                       "was added")
        first.setdefault(h, (line, ex.answer))
    return out


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


def _read_records(path: Path) -> tuple[list[tuple[int, object]], list[str], list[str]]:
    """(line number, record) for each line or row, `FILE:LINE: reason` for each one that does not parse, and
    notes on how the file was read that its user should know (a text not in UTF-8, a title skipped)."""
    suffix = path.suffix.lower()
    if suffix == ".xlsx":
        return _xlsx_records(path)
    raw, encoding = _read_text(path)
    records: list[tuple[int, object]] = []
    problems: list[str] = []
    notes = [] if encoding == "UTF-8" else [f"the file's text is {encoding}, not UTF-8"]
    if suffix in (".jsonl", ".json", ".ndjson") and raw.lstrip().startswith("["):
        records, problems = _json_array_records(path, raw)
    elif suffix in (".jsonl", ".json", ".ndjson"):
        for lineno, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                problems.append(f"{path}:{lineno}: broken JSON ({exc.msg} at column {exc.colno})")
            except RecursionError:
                problems.append(f"{path}:{lineno}: JSON nested too deeply to read (a row is one flat object)")
            except ValueError as exc:  # e.g. an integer with more digits than Python converts
                problems.append(f"{path}:{lineno}: unreadable JSON ({exc})")
    elif suffix in (".csv", ".tsv"):
        delimiter = "\t" if suffix == ".tsv" else ","
        reader = csv.reader(io.StringIO(raw), delimiter=delimiter)
        previous_limit = csv.field_size_limit(_MAX_CSV_FIELD)
        try:
            try:
                title = _title_rows(csv.reader(io.StringIO(raw), delimiter=delimiter))
            except csv.Error:
                title = 0  # the header's own reading reports it
            for _ in range(title):
                next(reader)
            if title:
                notes.append(f"{count(title, 'row')} above the header skipped: a title")
            header = _csv_header(path, reader)
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as exc:
                    # The reader cannot resume after a broken field: report it and stop.
                    reason = (f"a field is longer than {_MAX_CSV_FIELD:,} characters (no question or answer may be)"
                              if "field larger" in str(exc) else f"unreadable CSV ({exc})")
                    problems.append(f"{path}:{reader.line_num}: {reason}")
                    break
                # line_num is the physical line where the row ended (quoted fields can span lines).
                if not row:
                    continue
                if len(row) > len(header):
                    problems.append(f"{path}:{reader.line_num}: more fields than the header has")
                    continue
                records.append((reader.line_num, {k: v for k, v in zip(header, row) if k}))
        finally:
            csv.field_size_limit(previous_limit)
    else:
        raise ImportFileError([f"{path}: unknown file type {suffix or '(none)'}; expected .jsonl, .json, .csv or .xlsx"])
    return records, problems, notes


def _has_system_prompt(obj: object) -> bool:
    """A row's own system prompt: LLaMA-Factory's and ms-swift's `system`, or a system turn of a chat."""
    if not isinstance(obj, dict):
        return False
    if isinstance(obj.get("system"), str) and obj["system"].strip():
        return True
    turns = obj.get("messages") or obj.get("conversations")
    return isinstance(turns, list) and any(
        isinstance(t, dict) and (t.get("role") or t.get("from")) == "system" and str(t.get("content") or
                                                                                  t.get("value") or "").strip()
        for t in turns)


def _xlsx_records(path: Path) -> tuple[list[tuple[int, object]], list[str], list[str]]:
    """The first sheet of an Excel workbook, read as a CSV is: its header row (the first, or the first under a
    title: _title_rows) names the columns, each row after it is a record (row number as its line). Numbers and
    dates are written as text (19 -> "19")."""
    import openpyxl
    from openpyxl.utils.exceptions import InvalidFileException

    data = _read_bytes(path)  # says what is wrong with a path that is not a readable file
    try:
        book = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    except (InvalidFileException, zipfile.BadZipFile, KeyError, OSError, ValueError) as exc:
        raise ImportFileError([f"{path}: not a readable Excel workbook ({exc}); save it as .xlsx or CSV"]) from None
    try:
        sheet = book.worksheets[0] if book.worksheets else None
        title = _title_rows(sheet.iter_rows(values_only=True, max_row=_TITLE_ROWS + 1)) if sheet is not None else 0
        rows = sheet.iter_rows(values_only=True, min_row=title + 1) if sheet is not None else iter(())
        header = _checked_header(path, [_cell_text(v).strip() for v in next(rows, ())])
        records = []
        for number, row in enumerate(rows, start=title + 2):
            values = [_cell_text(v) for v in row]
            if not any(v.strip() for v in values):
                continue  # an empty row, as spreadsheets keep between blocks
            records.append((number, {k: v for k, v in zip(header, values) if k}))
        return records, [], [f"{count(title, 'row')} above the header skipped: a title"] if title else []
    finally:
        book.close()


def _cell_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _json_array_records(path: Path, raw: str) -> tuple[list[tuple[int, object]], list[str]]:
    """A file that is one JSON array of records (Alpaca's alpaca_data.json, LLaMA-Factory's datasets, what
    `json.dump(rows, f, indent=2)` writes): (the line each record starts on, record). The array is read element
    by element so that each problem names its line; reading stops at the first element that does not parse,
    since what follows a broken element cannot be located."""
    decoder = json.JSONDecoder()
    records: list[tuple[int, object]] = []

    counted = [0, 1]  # (position, its line): positions only grow, so each stretch of the file is counted once

    def line_at(pos: int) -> int:
        counted[1] += raw.count("\n", counted[0], pos)
        counted[0] = pos
        return counted[1]

    def skip_space(pos: int) -> int:
        while pos < len(raw) and raw[pos] in " \t\r\n":
            pos += 1
        return pos

    pos = skip_space(raw.index("[") + 1)
    if pos < len(raw) and raw[pos] == "]":
        pos = skip_space(pos + 1)
    else:
        while True:
            try:
                record, end = decoder.raw_decode(raw, pos)
            except json.JSONDecodeError as exc:
                return records, [f"{path}:{exc.lineno}: broken JSON ({exc.msg} at column {exc.colno})"]
            except RecursionError:
                return records, [f"{path}:{line_at(pos)}: JSON nested too deeply to read (a record is one flat object)"]
            except ValueError as exc:  # e.g. an integer with more digits than Python converts
                return records, [f"{path}:{line_at(pos)}: unreadable JSON ({exc})"]
            records.append((line_at(pos), record))
            pos = skip_space(end)
            if raw[pos : pos + 1] == ",":
                pos = skip_space(pos + 1)
                continue
            if raw[pos : pos + 1] == "]":
                pos = skip_space(pos + 1)
                break
            return records, [f"{path}:{line_at(pos)}: broken JSON (expected , or ] after the record that starts on "
                             f"line {records[-1][0]})"]
    if pos < len(raw):
        return records, [f"{path}:{line_at(pos)}: text after the JSON array ends; a file holds one array of records, "
                         "or one record per line (JSONL)"]
    return records, []


# Rows a spreadsheet often has above its header: a title ("员工常见问题汇总（2025版）"), a blank row. A header names at
# least two columns: rows of at most one filled cell before the first row of two are skipped, up to this many.
_TITLE_ROWS = 5


def _title_rows(rows) -> int:
    """How many of the leading rows are a title or blank above the header (see _TITLE_ROWS); 0 if none."""
    for i, row in enumerate(itertools.islice(rows, _TITLE_ROWS + 1)):
        if sum(1 for cell in row if str(cell if cell is not None else "").strip()) >= 2:
            return i
    return 0


def _csv_header(path: Path, reader) -> list[str]:
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration:
        header = []
    except csv.Error as exc:
        raise ImportFileError([f"{path}:1: unreadable header row ({exc})"]) from None
    return _checked_header(path, header)


def _checked_header(path: Path, header: list[str]) -> list[str]:
    """A CSV's or a sheet's header row, refused when it is empty or names a column twice."""
    if not any(header):
        raise ImportFileError([f"{path}:1: no header row"])
    repeated = [name for name, n in Counter(h for h in header if h).items() if n > 1]
    if repeated:
        # DictReader would keep the last of the two silently: which one holds the answer is anyone's guess.
        raise ImportFileError([f"{path}:1: column `{name}` appears {header.count(name)} times in the header; "
                               "name each column once" for name in repeated])
    return header


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise StoreError(f"{path}: no such file")
    if path.is_dir():
        raise StoreError(f"{path}: is a folder, expected a file")
    try:
        return path.read_bytes()
    except PermissionError:
        raise StoreError(f"{path}: not readable (permission denied)") from None


def _read_text(path: Path) -> tuple[str, str]:
    """(text, encoding): see store.text.decode_text."""
    data = _read_bytes(path)
    try:
        text, encoding = decode_text(data)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise StoreError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}), nor Chinese text in GB18030 "
                         "or GBK; save the file as UTF-8") from None
    nul = text.find("\x00")
    if nul >= 0:
        line = text[:nul].count("\n") + 1
        raise StoreError(f"{path}:{line}: contains a NUL byte; a text file holds none (UTF-16 without its byte order "
                         "mark? save the file as UTF-8)")
    return text, encoding

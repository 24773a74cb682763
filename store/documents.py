"""Reading knowledge-base files into titled passages (Markdown, plain text, HTML).

Passages are cut at paragraph boundaries to about `max_chars` characters, with the document title kept
on every passage so a passage alone still says what it is about.

A folder is read recursively without following links out of it: a committed `x.md -> ../.env` would otherwise put
a secret into every prompt that retrieves it. Every document is scanned for secrets and personal data
(store.sensitive) before anything is stored.
"""

from __future__ import annotations

import html
import os
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from store.db import StoreError
from store.kb import NewPassage
from store.sensitive import describe, find_sensitive, line_of
from store.teams import require_team
from store.text import CJK_TEXT_END

KB_SUFFIXES = (".md", ".markdown", ".txt", ".html", ".htm")


class _HTMLText(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.title = ""
        self.parts: list[str] = []
        self._in_title = False
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self._in_title = True
        elif tag in ("script", "style"):
            self._skip += 1
        elif tag in ("p", "div", "li", "br", "h1", "h2", "h3", "h4", "tr", "section"):
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False
        elif tag in ("script", "style"):
            self._skip -= 1

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        elif not self._skip:
            self.parts.append(data)


@dataclass(frozen=True)
class DocumentImport:
    read: int  # documents read
    changed: int  # of which new or changed
    skipped: tuple[str, ...] = ()  # `PATH: why` for links not followed
    notices: tuple[str, ...] = ()  # `FILE:LINE: …` contact details imported (shown, not refused)


def find_kb_files(paths: list[Path], skipped: list[str] | None = None) -> list[Path]:
    """The documents under `paths`. In a folder, links that lead out of it are not followed: each is named in
    `skipped` (when given) with where it leads. A file named on its own is read even if it is a link: its name was
    typed by the person importing."""
    files: list[Path] = []
    for p in paths:
        if not p.exists():
            raise StoreError(f"{p}: no such file or folder")
        if p.is_dir():
            files += _folder_files(p, skipped if skipped is not None else [])
        elif p.suffix.lower() in KB_SUFFIXES:
            files.append(p)
        else:
            raise StoreError(f"{p}: unsupported document type {p.suffix or '(none)'}; expected Markdown, text or HTML")
    return files


def _folder_files(folder: Path, skipped: list[str]) -> list[Path]:
    root = folder.resolve()
    found: list[Path] = []
    # os.walk does not descend into linked folders (followlinks=False); a linked folder inside this one is reached
    # through its real path anyway, so only links that lead out of it are reported.
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        here = Path(dirpath)
        for name in sorted(dirnames):
            d = here / name
            if d.is_symlink() and not _inside(d, root):
                skipped.append(f"{d}: a link to {os.readlink(d)}, outside {folder}; not followed")
        dirnames[:] = sorted(n for n in dirnames if not (here / n).is_symlink())
        for name in sorted(filenames):
            f = here / name
            if f.suffix.lower() not in KB_SUFFIXES:
                continue
            if f.is_symlink():
                if not f.exists():
                    skipped.append(f"{f}: a broken link to {os.readlink(f)}; skipped")
                    continue
                if not _inside(f, root):
                    skipped.append(f"{f}: a link to {os.readlink(f)}, outside {folder}; not followed")
                    continue
            if f.is_file():
                found.append(f)
    return sorted(found)


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root)


def _decode(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except PermissionError:
        raise StoreError(f"{path}: not readable (permission denied)") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise StoreError(f"{path}:{line}: not UTF-8 text; save the document as UTF-8") from None


def read_document(path: Path, text: str | None = None) -> tuple[str, str]:
    """(title, plain text) of one document (`text`: its contents, when already read)."""
    text = _decode(path) if text is None else text
    if path.suffix.lower() in (".html", ".htm"):
        parser = _HTMLText()
        parser.feed(text)
        body = html.unescape("".join(parser.parts))
        body = re.sub(r"[ \t]+", " ", body)
        body = re.sub(r"\n\s*\n+", "\n\n", body).strip()
        title = " ".join(parser.title.split()) or _first_line(body) or path.stem
        return title, body
    title = _first_line(text) or path.stem
    if path.suffix.lower() in (".md", ".markdown"):
        heading = re.search(r"^#\s+(.+)$", text, flags=re.M)
        if heading:
            title = heading.group(1).strip()
    return title, text.strip()


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip().lstrip("#").strip()[:120]
    return ""


def chunk_text(title: str, text: str, *, max_chars: int = 700) -> list[str]:
    """Split at blank lines (then at sentence ends for long paragraphs), packing up to max_chars."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    pieces: list[str] = []
    for para in paragraphs:
        if len(para) <= max_chars:
            pieces.append(para)
            continue
        sentences = re.split(r"(?<=[.!?。！？])\s*", para)
        buf = ""
        for s in sentences:
            if buf and len(buf) + len(s) > max_chars:
                pieces.append(buf.strip())
                buf = ""
            buf += s + ("" if CJK_TEXT_END.search(s) else " ")
        if buf.strip():
            pieces.append(buf.strip())
    chunks: list[str] = []
    buf = ""
    for piece in pieces:
        if buf and len(buf) + len(piece) + 2 > max_chars:
            chunks.append(buf)
            buf = ""
        buf = f"{buf}\n\n{piece}" if buf else piece
    if buf:
        chunks.append(buf)
    return chunks or [title]


def document_passages(path: Path, doc_path: str, *, max_chars: int = 700, text: str | None = None) -> list[NewPassage]:
    title, text = read_document(path, text)
    if not text.strip():
        raise StoreError(f"{path}: the document is empty")
    return [NewPassage(doc_path=doc_path, title=title, chunk_index=i, content=chunk)
            for i, chunk in enumerate(chunk_text(title, text, max_chars=max_chars))]


def import_documents(db, paths: list[Path], *, allow_sensitive: bool = False, max_chars: int = 700,
                     team: str | None = None) -> DocumentImport:
    """Read every document under `paths`, then store them.

    All files are parsed and scanned before anything is written: one bad document stops the import with nothing
    changed, and so does one holding secrets or identity or payment numbers (each reported as `FILE:LINE: …`)
    unless `allow_sensitive`. Contact details (e-mail addresses, phone numbers) are imported and listed: KB
    documents publish role mailboxes and hotlines by design.
    Each passage's `doc_path` is relative to the folder given (or the file's own folder). `max_chars`: the
    passage size (700 ranks best of 350, 700 and 1,200: bench/retrieval_recall.py --chunking).
    `team`: the documents belong to that team (it must exist; store.teams), None: shared.
    """
    from store.kb import replace_document

    team = require_team(db, team)
    skipped: list[str] = []
    files = find_kb_files(paths, skipped)
    if not files:
        raise StoreError("no Markdown, text or HTML documents found in " + ", ".join(map(str, paths))
                         + "".join(f"\n{s}" for s in skipped))
    parsed, flagged, notices = [], [], []
    for f in files:
        text = _decode(f)
        for finding in find_sensitive(text):
            where = f"{f}:{line_of(text, finding.start)}"
            (flagged if finding.blocks else notices).append(f"{where}: {describe([finding])}")
        base = next((p for p in paths if p.is_dir() and f.is_relative_to(p)), f.parent)
        parsed.append(document_passages(f, f.relative_to(base).as_posix(), text=text, max_chars=max_chars))
    if flagged and not allow_sensitive:
        raise StoreError("\n".join([f"{line} (secret or personal data)" for line in flagged] + [
            f"nothing imported: {len(flagged)} finding(s) in the documents; remove them, or import with "
            "--allow-sensitive if they belong in the knowledge base"]))
    changed = sum(replace_document(db, passages[0].doc_path, passages, team=team)[1] for passages in parsed)
    return DocumentImport(len(files), changed, tuple(skipped), tuple(notices + (flagged if allow_sensitive else [])))

"""Reading knowledge-base files into titled passages (Markdown, plain text, HTML).

Passages are cut at paragraph boundaries to about `max_chars` characters, with the document title kept
on every passage so a passage alone still says what it is about.
"""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser
from pathlib import Path

from store.db import StoreError
from store.kb import NewPassage

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


def find_kb_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if not p.exists():
            raise StoreError(f"{p}: no such file or folder")
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in KB_SUFFIXES)
        elif p.suffix.lower() in KB_SUFFIXES:
            files.append(p)
        else:
            raise StoreError(f"{p}: unsupported document type {p.suffix or '(none)'}; expected Markdown, text or HTML")
    return files


def read_document(path: Path) -> tuple[str, str]:
    """(title, plain text) of one document."""
    try:
        raw = path.read_bytes()
    except PermissionError:
        raise StoreError(f"{path}: not readable (permission denied)") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise StoreError(f"{path}:{line}: not UTF-8 text; save the document as UTF-8") from None
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
            buf += s + ("" if re.search(r"[\u3000-\u9fff]$", s) else " ")
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


def document_passages(path: Path, doc_path: str, *, max_chars: int = 700) -> list[NewPassage]:
    title, text = read_document(path)
    if not text.strip():
        raise StoreError(f"{path}: the document is empty")
    return [NewPassage(doc_path=doc_path, title=title, chunk_index=i, content=chunk)
            for i, chunk in enumerate(chunk_text(title, text, max_chars=max_chars))]


def import_documents(db, paths: list[Path]) -> tuple[int, int]:
    """Read every document under `paths`, then store them. Returns (documents read, new or changed).

    All files are parsed before anything is written: one bad document stops the import with nothing changed.
    Each passage's `doc_path` is relative to the folder given (or the file's own folder).
    """
    from store.kb import replace_document

    files = find_kb_files(paths)
    if not files:
        raise StoreError("no Markdown, text or HTML documents found in " + ", ".join(map(str, paths)))
    parsed = []
    for f in files:
        base = next((p for p in paths if p.is_dir() and f.is_relative_to(p)), f.parent)
        parsed.append(document_passages(f, f.relative_to(base).as_posix()))
    changed = sum(replace_document(db, passages[0].doc_path, passages)[1] for passages in parsed)
    return len(files), changed

"""Reading knowledge-base files into titled passages (Markdown, plain text, HTML, Word .docx, PDF).

Passages are cut at paragraph boundaries to about `max_chars` characters, with the document title kept
on every passage so a passage alone still says what it is about.

A folder is read recursively without following links out of it: a committed `x.md -> ../.env` would otherwise put
a secret into every prompt that retrieves it. Files of other types in a folder are skipped and counted by type.
Every document is scanned for secrets and personal data (store.sensitive) before anything is stored.

HTML is read for its text: table cells joined with " | ", navigation and footers dropped (unless nothing else is
there), scripts and styles never read. Markdown front matter (YAML between `---` lines, TOML between `+++`, as
Jekyll, Hugo, Docusaurus and Obsidian write it) is metadata, not content: it is dropped, and its `title` is the
title. Word and PDF files are read for their text: a .docx's paragraphs and table rows in order (headings become
Markdown headings, so the first is the title), a PDF's text layer page by page (pypdf; its metadata title, when
set and not a file name, is the title). A scanned PDF without a text layer is refused with that reason: kbloop does
no OCR. Word heading styles are found by name (styles.xml), since their ids are localised.
"""

from __future__ import annotations

import html
import logging
import os
import re
import zipfile
from collections import Counter
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from xml.etree import ElementTree

from store.db import StoreError
from store.kb import NewPassage
from store.sensitive import describe, find_sensitive, line_of
from store.teams import require_team
from store.text import CJK_TEXT_END, decode_text

KB_SUFFIXES = (".md", ".markdown", ".txt", ".html", ".htm", ".docx", ".pdf")
KB_TYPES = "Markdown, text, HTML, Word (.docx) or PDF"
_BINARY_SUFFIXES = (".docx", ".pdf")  # read for their text (document_text); their findings name a line of that text


# Elements that start a block of their own; the text before and after them is not one word. Text in skipped
# elements is not the page's content: code, and the navigation and footer an exported wiki page repeats.
_HTML_BLOCKS = frozenset("""p div li br hr h1 h2 h3 h4 h5 h6 tr table thead tbody ul ol dl dt dd section article header
main aside blockquote pre figure figcaption details summary form fieldset""".split())
_HTML_SKIPPED = frozenset("script style noscript template svg".split())
_HTML_BOILERPLATE = frozenset("nav footer".split())  # read after all when a page is nothing else (read_document)


class _HTMLText(HTMLParser):
    """A page's text. A table becomes one block, a row a line of cells joined by " | ", and a header row of <th>
    cells is followed by a Markdown rule ("--- | ---"), so that chunk_text can cut a long table between rows, each
    piece under its header (_table_rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.title = ""
        self.parts: list[str] = []
        self._in_title = False
        self._skip = 0
        self._boilerplate = 0
        self.boilerplate: list[str] = []  # the text of nav and footer elements
        self._tables: list[list[int]] = []  # per open table: [rows so far, cells in this row, all of them <th>]
        self._in_cell = 0
        self._pre = 0  # inside <pre>, line breaks are the text's own; elsewhere they are spaces, as a browser shows

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self._in_title = True
        elif tag in _HTML_SKIPPED:
            self._skip += 1
        elif tag in _HTML_BOILERPLATE:
            self._boilerplate += 1
            self.boilerplate.append("\n\n")
        elif tag in ("td", "th") and self._tables:
            row = self._tables[-1]
            if row[1]:
                self._out().append(" | ")
            row[1] += 1
            row[2] = row[2] and tag == "th"
            self._in_cell += 1
        elif tag == "tr" and self._tables:
            self._tables[-1][1:] = [0, 1]
            self._out().append("\n")
        elif tag == "table":
            self._tables.append([0, 0, 1])
            self._out().append("\n\n")
        elif tag in _HTML_BLOCKS and not (self._tables and tag in ("thead", "tbody")):
            self._pre += tag == "pre"
            self._out().append(" " if self._in_cell else "\n\n")  # a cell's paragraphs stay on its row

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False
        elif tag in _HTML_SKIPPED:
            self._skip = max(0, self._skip - 1)
        elif tag in _HTML_BOILERPLATE:
            self._boilerplate = max(0, self._boilerplate - 1)
        elif tag in ("td", "th") and self._tables:
            self._in_cell = max(0, self._in_cell - 1)
        elif tag == "tr" and self._tables:
            rows, cells, header = self._tables[-1]
            if rows == 0 and header and cells > 1:
                self._out().append("\n" + " | ".join(["---"] * cells))
            self._tables[-1][0] += 1
        elif tag == "table" and self._tables:
            self._tables.pop()
            self._out().append("\n\n")
        elif tag in _HTML_BLOCKS and not (self._tables and tag in ("thead", "tbody")):
            self._pre = max(0, self._pre - (tag == "pre"))
            self._out().append(" " if self._in_cell else "\n\n")

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        elif self._skip:
            return
        elif self._tables and not self._in_cell:
            if data.strip():  # a <caption>, or stray text between cells: a paragraph of its own, before the rows
                self._out().append("\n\n" + " ".join(data.split()) + "\n\n")
        else:
            self._out().append(data if self._pre and not self._in_cell else data.replace("\n", " "))

    def _out(self) -> list[str]:
        return self.boilerplate if self._boilerplate else self.parts


@dataclass(frozen=True)
class DocumentImport:
    read: int  # documents read
    changed: int  # of which new or changed
    skipped: tuple[str, ...] = ()  # `PATH: why` for links not followed
    notices: tuple[str, ...] = ()  # `FILE:LINE: …` contact details imported (shown, not refused)
    removed: tuple[str, ...] = ()  # with `prune`: the documents removed because the import did not include them


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
            raise StoreError(f"{p}: unsupported document type {p.suffix or '(none)'}; expected {KB_TYPES}")
    return files


def _folder_files(folder: Path, skipped: list[str]) -> list[Path]:
    root = folder.resolve()
    found: list[Path] = []
    other_types: Counter[str] = Counter()
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
                if not name.startswith("."):  # .DS_Store, .gitignore: not documents anyone meant
                    other_types[f.suffix.lower() or "(no extension)"] += 1
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
    if other_types:
        n = sum(other_types.values())
        kinds = ", ".join(f"{suffix} {count}" for suffix, count in sorted(other_types.items(), key=lambda kv: (-kv[1], kv[0])))
        skipped.append(f"{folder}: {n} {'file' if n == 1 else 'files'} of types kbloop does not read ({kinds}); "
                       f"skipped (it reads {KB_TYPES})")
    return sorted(found)


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root)


def _decode(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except PermissionError:
        raise StoreError(f"{path}: not readable (permission denied)") from None
    try:
        return decode_text(raw)[0]
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise StoreError(f"{path}:{line}: not UTF-8 text, nor Chinese text in GB18030 or GBK; save the document as "
                         "UTF-8") from None


def document_text(path: Path) -> str:
    """What a document says, as text: a text file decoded; a .docx's paragraphs; a PDF's text layer."""
    suffix = path.suffix.lower()
    if suffix == ".docx":
        return _docx_text(path)
    if suffix == ".pdf":
        return _pdf_text(path)
    return _decode(path)


_W = "{http://schemas.openxmlformats.org/wordprocessingml/2006/main}"
_MAX_DOCX_XML = 200 * 1024 * 1024


def _docx_text(path: Path) -> str:
    """The body of word/document.xml in order, one block per paragraph; a Title or Heading N paragraph as a
    Markdown heading (Title and Heading 1: `#`), so read_document takes the first as the title; a table one
    block, a row a line of cells joined by " | ", a row Word marks as the header followed by a Markdown rule (as
    HTML tables are read)."""
    try:
        with zipfile.ZipFile(path) as z:
            size = z.getinfo("word/document.xml").file_size
            if size > _MAX_DOCX_XML:  # unpacked size, read before unpacking: a small file can unpack to gigabytes
                raise StoreError(f"{path}: its text part unpacks to {size:,} bytes, over the {_MAX_DOCX_XML:,} read")
            root = ElementTree.fromstring(z.read("word/document.xml"))
            levels = _docx_heading_levels(z)
    except (zipfile.BadZipFile, KeyError, ElementTree.ParseError, OSError) as exc:
        raise StoreError(f"{path}: not a readable Word document ({exc}); save it as .docx") from None
    body = root.find(f"{_W}body")
    return "\n\n".join(_docx_blocks(body, levels)) if body is not None else ""


def _docx_heading_levels(z: zipfile.ZipFile) -> dict[str, int]:
    """Style id -> heading level (Title: 1). Ids are localised ("Heading1" in English Word, "1" in Chinese, …);
    the names in word/styles.xml are not ("heading 1", "Title"), so the ids are looked up there."""
    levels = {"title": 1, **{f"heading{n}": n for n in range(1, 10)}}  # the English ids, when styles.xml is absent
    try:
        styles = ElementTree.fromstring(z.read("word/styles.xml"))
    except KeyError:
        return levels
    for style in styles.iter(f"{_W}style"):
        name = style.find(f"{_W}name")
        name = (name.get(f"{_W}val") or "").lower() if name is not None else ""
        level = 1 if name == "title" else int(m.group(1)) if (m := re.fullmatch(r"heading ([1-9])", name)) else 0
        if level:
            levels[(style.get(f"{_W}styleId") or "").lower()] = level
    return levels


def _docx_blocks(parent, levels: dict[str, int]) -> list[str]:
    blocks = []
    for child in parent:
        if child.tag == f"{_W}p":
            text = _docx_paragraph(child)
            style = child.find(f"{_W}pPr/{_W}pStyle")
            level = levels.get((style.get(f"{_W}val") or "").lower(), 0) if style is not None else 0
            if text:
                blocks.append(f"{'#' * level} {text}" if level else text)
        elif child.tag == f"{_W}tbl":
            lines = []
            for i, row in enumerate(child.findall(f"{_W}tr")):
                cells = [" ".join(filter(None, map(_docx_paragraph, cell.iter(f"{_W}p")))) for cell in row.findall(f"{_W}tc")]
                if any(cells):
                    lines.append(" | ".join(cells))
                    if i == 0 and len(cells) > 1 and row.find(f"{_W}trPr/{_W}tblHeader") is not None:
                        lines.append(" | ".join(["---"] * len(cells)))  # Word's header row, as HTML's <th> row
            if lines:
                blocks.append("\n".join(lines))
        elif child.tag == f"{_W}sdt":  # a content control: its paragraphs and tables are in sdtContent
            content = child.find(f"{_W}sdtContent")
            if content is not None:
                blocks += _docx_blocks(content, levels)
    return blocks


def _docx_paragraph(para) -> str:
    """A paragraph's text: its runs' text, tabs and line breaks (text boxes anchored in it included)."""
    return "".join((node.text or "") if node.tag == f"{_W}t" else ("\t" if node.tag == f"{_W}tab" else "\n")
                   for node in para.iter() if node.tag in (f"{_W}t", f"{_W}tab", f"{_W}br")).strip()


def _pdf_text(path: Path) -> str:
    """The PDF's text layer, page by page (pypdf); its metadata title first, as a Markdown heading, when set."""
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    # pypdf logs what it repairs ("EOF marker not found"); the user gets one line, the StoreError, if it cannot read
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    try:
        reader = PdfReader(path)
        # Many PDFs are encrypted only to restrict printing or copying, with an empty password to open them.
        if reader.is_encrypted and not _opens_without_password(reader):
            raise StoreError(f"{path}: the PDF needs a password to open; save an unprotected copy to import it")
        pages = [page.extract_text() or "" for page in reader.pages]
        title = " ".join(str(reader.metadata.title or "").split()) if reader.metadata else ""
    except (PyPdfError, OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        # pypdf meets malformed files with whichever of these its parser hits first
        raise StoreError(f"{path}: not a readable PDF ({type(exc).__name__}: {exc})") from None
    body = "\n\n".join(p.strip() for p in pages if p.strip())
    if not body:
        raise StoreError(f"{path}: the PDF has no text layer (a scanned document?); kbloop does not read text "
                         "from images: import a PDF with text, or its text")
    # Writers often leave the file they printed from as the title ("Microsoft Word - handbook.docx"): no title.
    if re.search(r"\.(docx?|pdf|pptx?|xlsx?|odt|rtf|txt|md|html?|pages|key)$", title, flags=re.I) or \
            title.lower() in ("untitled", "unknown"):
        title = ""
    return f"# {title}\n\n{body}" if title else body


def _opens_without_password(reader) -> bool:
    from pypdf.errors import DependencyError, PyPdfError

    try:
        return bool(reader.decrypt(""))
    except (PyPdfError, DependencyError, NotImplementedError):  # DependencyError: AES without `cryptography`
        return False


def read_document(path: Path, text: str | None = None) -> tuple[str, str]:
    """(title, plain text) of one document (`text`: its contents, when already read: document_text)."""
    text = document_text(path) if text is None else text
    if path.suffix.lower() in (".html", ".htm"):
        parser = _HTMLText()
        parser.feed(text)
        # An unclosed <nav> would hide the rest of the page: a page with nothing outside nav and footer is read whole.
        body = html.unescape("".join(parser.parts if "".join(parser.parts).strip() else parser.boilerplate))
        body = re.sub(r"[ \t]+", " ", body)
        body = re.sub(r" ?\n ?", "\n", body)
        body = re.sub(r"\n\s*\n+", "\n\n", body).strip()
        title = " ".join(parser.title.split()) or _first_line(body) or path.stem
        return title, body
    meta_title = None
    if path.suffix.lower() in (".md", ".markdown"):
        meta_title, text = _front_matter(text)
    title = _first_line(text) or path.stem
    if path.suffix.lower() in (".md", ".markdown", *_BINARY_SUFFIXES):
        heading = re.search(r"^#\s+(.+)$", text, flags=re.M)
        if heading:
            title = heading.group(1).strip()
    return meta_title or title, text.strip()


_FRONT_MATTER = re.compile(r"\A(---|\+\+\+)[ \t]*\r?\n(.*?)\r?\n\1[ \t]*(?:\r?\n|\Z)", re.S)


def _front_matter(text: str) -> tuple[str | None, str]:
    """(its `title`, the text without it) for Markdown that opens with front matter, as Jekyll, Hugo, Docusaurus and
    Obsidian write it (YAML between `---` lines, TOML between `+++`); metadata is not content, and "---" is no
    title. Front matter that does not parse is still removed; it just gives no title."""
    match = _FRONT_MATTER.match(text)
    if not match:
        return None, text
    try:
        if match.group(1) == "---":
            import yaml

            meta = yaml.safe_load(match.group(2))
        else:
            import tomllib

            meta = tomllib.loads(match.group(2))
    except Exception:  # yaml.YAMLError, tomllib.TOMLDecodeError: a malformed header is not the reader's problem
        meta = None
    title = meta.get("title") if isinstance(meta, dict) else None
    return (" ".join(str(title).split()) or None) if title is not None else None, text[match.end():]


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip().lstrip("#").strip()[:120]
    return ""


def chunk_text(title: str, text: str, *, max_chars: int = 700) -> list[str]:
    """Split at blank lines (then at sentence ends for long paragraphs), packing up to max_chars. A sentence still
    longer (a list or table without full stops, Chinese with commas only, a long link) is cut by _split_long."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    pieces: list[str] = []
    for para in paragraphs:
        if len(para) <= max_chars:
            pieces.append(para)
            continue
        rows = _table_rows(para, max_chars)
        if rows is not None:
            pieces += rows
            continue
        sentences = re.split(r"(?<=[.!?])\s+|(?<=[。！？])\s*", para)
        buf = ""
        for s in (part for sentence in sentences for part in _split_long(sentence, max_chars)):
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


_TABLE_RULE = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?$")  # | --- | :---: |


def _table_rows(para: str, max_chars: int) -> list[str] | None:
    """A table longer than a passage (every line a row of cells joined by "|"; a Markdown one has a header and a
    rule) as pieces of whole rows, each under the header if there is one, so that a row read alone still says
    what its cells are; None when `para` is not a table."""
    lines = para.split("\n")
    if len(lines) < 2 or not all("|" in line for line in lines):
        return None
    ruled = len(lines) >= 3 and _TABLE_RULE.match(lines[1].strip())
    header = lines[0] + "\n" + lines[1] + "\n" if ruled else ""
    room = max_chars - len(header)
    if room < max_chars // 2:  # a header that long leaves too little for rows: cut as any long text
        return None
    pieces: list[str] = []
    for row in (part for line in lines[2 if ruled else 0:] for part in _split_long(line, room)):
        if pieces and len(pieces[-1]) + 1 + len(row) <= max_chars:
            pieces[-1] += "\n" + row
        else:
            pieces.append(header + row)
    return pieces


# Where a sentence longer than a passage is cut, in order: at line breaks (kept, so a table stays a table), after
# clause marks and at spaces; a run with none of them (a link, unpunctuated Chinese) at the limit itself.
_LONG_BREAKS = ((re.compile(r"\n"), "\n"), (re.compile(r"(?<=[，；、：,;:])\s*|\s+"), " "))


def _split_long(text: str, max_chars: int, level: int = 0) -> list[str]:
    """`text` as pieces of at most max_chars, each cut where _LONG_BREAKS says; `text` itself when it fits."""
    if len(text) <= max_chars:
        return [text]
    if level == len(_LONG_BREAKS):
        return [text[i:i + max_chars] for i in range(0, len(text), max_chars)]
    pattern, joiner = _LONG_BREAKS[level]
    out: list[str] = []
    buf = ""
    for part in (p for piece in pattern.split(text) if piece.strip() for p in _split_long(piece.strip(), max_chars,
                                                                                          level + 1)):
        sep = "" if not buf or (joiner == " " and CJK_TEXT_END.search(buf)) else joiner
        if buf and len(buf) + len(sep) + len(part) > max_chars:
            out.append(buf)
            buf, sep = "", ""
        buf += sep + part
    if buf:
        out.append(buf)
    return out


def document_passages(path: Path, doc_path: str, *, max_chars: int = 700, text: str | None = None) -> list[NewPassage]:
    title, text = read_document(path, text)
    if not text.strip():
        raise StoreError(f"{path}: the document is empty")
    return [NewPassage(doc_path=doc_path, title=title, chunk_index=i, content=chunk)
            for i, chunk in enumerate(chunk_text(title, text, max_chars=max_chars))]


def import_documents(db, paths: list[Path], *, allow_sensitive: bool = False, max_chars: int = 700,
                     team: str | None = None, prune: bool = False) -> DocumentImport:
    """Read every document under `paths`, then store them.

    All files are parsed and scanned before anything is written: one bad document stops the import with nothing
    changed, and so does one holding secrets or identity or payment numbers (each reported as `FILE:LINE: …`)
    unless `allow_sensitive`. Contact details (e-mail addresses, phone numbers) are imported and listed: KB
    documents publish role mailboxes and hotlines by design.
    Each passage's `doc_path` is relative to the folder given (or the file's own folder). `max_chars`: the
    passage size (700 ranks best of 350, 700 and 1,200: bench/retrieval_recall.py --chunking).
    `team`: the documents belong to that team (it must exist; store.teams), None: shared.
    `prune`: what was imported is the whole knowledge base of `team` (or the shared one): its documents that this
    import did not include (deleted or renamed since) are removed, once the import succeeded.
    """
    from store.kb import delete_documents, list_documents, replace_document

    team = require_team(db, team)
    skipped: list[str] = []
    files = find_kb_files(paths, skipped)
    if not files:
        raise StoreError(f"no {KB_TYPES.replace(' or ', ', ')} documents found in " + ", ".join(map(str, paths))
                         + "".join(f"\n{s}" for s in skipped))
    named = {p for p in paths if not p.is_dir()}
    parsed, flagged, notices = [], [], []
    for f in files:
        text = document_text(f)
        if f not in named and not read_document(f, text)[1].strip():
            skipped.append(f"{f}: empty; skipped")  # a placeholder page in a folder: nothing to import, nothing wrong
            continue
        for finding in find_sensitive(text):
            line = line_of(text, finding.start)
            where = f"{f} (line {line} of its text)" if f.suffix.lower() in _BINARY_SUFFIXES else f"{f}:{line}"
            (flagged if finding.blocks else notices).append(f"{where}: {describe([finding])}")
        base = next((p for p in paths if p.is_dir() and f.is_relative_to(p)), f.parent)
        parsed.append(document_passages(f, f.relative_to(base).as_posix(), text=text, max_chars=max_chars))
    if flagged and not allow_sensitive:
        raise StoreError("\n".join([f"{line} (secret or personal data)" for line in flagged] + [
            f"nothing imported: {len(flagged)} finding(s) in the documents; remove them, or import with "
            "--allow-sensitive if they belong in the knowledge base"]))
    if not parsed:
        raise StoreError("every document found is empty: " + ", ".join(map(str, files)))
    changed = sum(replace_document(db, passages[0].doc_path, passages, team=team)[1] for passages in parsed)
    removed: list[str] = []
    if prune:
        imported = {passages[0].doc_path for passages in parsed}
        removed = [d.doc_path for d in list_documents(db, team=team) if d.doc_path not in imported]
        delete_documents(db, removed, team=team)
    return DocumentImport(len(parsed), changed, tuple(skipped), tuple(notices + (flagged if allow_sensitive else [])),
                          tuple(removed))

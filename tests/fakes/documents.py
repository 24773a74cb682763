"""Word and PDF files written byte by byte, as Word and PDF writers lay them out, for the import tests (no
document library writes them, so what is read is the format itself, not a library's round trip)."""

from __future__ import annotations

import zipfile
from pathlib import Path
from xml.sax.saxutils import escape

_CONTENT_TYPES = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
    '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
    '<Default Extension="xml" ContentType="application/xml"/>'
    '<Override PartName="/word/document.xml" '
    'ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/></Types>')
_RELS = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
    '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
    '<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" '
    'Target="word/document.xml"/></Relationships>')


def _paragraph(style: str | None, text: str) -> str:
    ppr = f'<w:pPr><w:pStyle w:val="{style}"/></w:pPr>' if style else ""
    runs = []
    for i, line in enumerate(text.split("\n")):
        if i:
            runs.append("<w:r><w:br/></w:r>")
        half = len(line) // 2
        runs += [f'<w:r><w:t xml:space="preserve">{escape(part)}</w:t></w:r>' for part in (line[:half], line[half:])]
    return f"<w:p>{ppr}{''.join(runs)}</w:p>"


def write_docx(path: Path, blocks: list[tuple[str | None, str] | list[list[str]] | dict], *,
               styles: dict[str, str] | None = None) -> Path:
    """A .docx of (style id, text) paragraphs, style id e.g. "Title", "Heading2" or None, and tables (a list of rows
    of cell texts); a text's "\\n" is a line break inside its paragraph, and each paragraph's text is split over two
    runs, as Word does after an edit. `styles`: style id -> style name, written to word/styles.xml (Chinese Word
    names its heading styles "heading 1" but gives them the ids "1", "2", …, and Title the id "a3")."""
    body = []
    for block in blocks:
        if isinstance(block, dict):  # {"header": [cells], "rows": [[cells], …]}: the header row marked as Word marks
            # one to repeat on every page (Table Properties > Row > "Repeat as header row at the top of each page")
            header = ("<w:tr><w:trPr><w:tblHeader/></w:trPr>"
                      + "".join(f"<w:tc>{_paragraph(None, cell)}</w:tc>" for cell in block["header"]) + "</w:tr>")
            rows = "".join("<w:tr>" + "".join(f"<w:tc>{_paragraph(None, cell)}</w:tc>" for cell in row) + "</w:tr>"
                           for row in block["rows"])
            body.append(f"<w:tbl>{header}{rows}</w:tbl>")
        elif isinstance(block, list):
            rows = "".join("<w:tr>" + "".join(f"<w:tc>{_paragraph(None, cell)}</w:tc>" for cell in row) + "</w:tr>"
                           for row in block)
            body.append(f"<w:tbl>{rows}</w:tbl>")
        else:
            body.append(_paragraph(*block))
    document = ('<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
                '<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main">'
                f'<w:body>{"".join(body)}<w:sectPr/></w:body></w:document>')
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("[Content_Types].xml", _CONTENT_TYPES)
        z.writestr("_rels/.rels", _RELS)
        z.writestr("word/document.xml", document)
        if styles:
            z.writestr("word/styles.xml", '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
                       '<w:styles xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main">'
                       + "".join(f'<w:style w:type="paragraph" w:styleId="{escape(i)}"><w:name w:val="{escape(n)}"/>'
                                 "</w:style>" for i, n in styles.items()) + "</w:styles>")
    return path


def write_pdf(path: Path, pages: list[list[str]], *, title: str | None = None) -> Path:
    """A PDF whose pages hold these lines of text, in any script: a Type0 font with Identity-H encoding (each
    character's code is its code point) and a ToUnicode map, which is how PDF writers make CJK text extractable.
    The font itself is not embedded: text extraction reads the map, not the glyphs. `pages=[[]]`: a page
    without text (a scan's page holds only an image)."""
    chars = sorted({ord(c) for page in pages for line in page for c in line})
    if any(c > 0xFFFF for c in chars):
        raise ValueError("write_pdf writes characters of the Basic Multilingual Plane only")
    objects: list[bytes] = []

    def add(body: bytes) -> int:
        objects.append(body)
        return len(objects)

    def stream(data: bytes, extra: bytes = b"") -> bytes:
        return b"<< /Length %d%s >>\nstream\n%s\nendstream" % (len(data), extra, data)

    catalog = add(b"")  # filled in once the page tree's number is known
    pages_id = add(b"")
    cmap = ("/CIDInit /ProcSet findresource begin 12 dict begin begincmap\n"
            "/CIDSystemInfo << /Registry (Adobe) /Ordering (UCS) /Supplement 0 >> def\n"
            "/CMapName /Adobe-Identity-UCS def /CMapType 2 def\n"
            "1 begincodespacerange <0000> <FFFF> endcodespacerange\n")
    for start in range(0, len(chars), 100):  # at most 100 entries per block
        block = chars[start : start + 100]
        cmap += f"{len(block)} beginbfchar\n" + "".join(f"<{c:04X}> <{c:04X}>\n" for c in block) + "endbfchar\n"
    cmap += "endcmap CMapName currentdict /CMap defineresource pop end end"
    to_unicode = add(stream(cmap.encode("ascii")))
    descriptor = add(b"<< /Type /FontDescriptor /FontName /KbloopTest /Flags 4 /FontBBox [0 -200 1000 900] "
                     b"/ItalicAngle 0 /Ascent 900 /Descent -200 /CapHeight 700 /StemV 80 >>")
    cid_font = add(b"<< /Type /Font /Subtype /CIDFontType2 /BaseFont /KbloopTest /CIDToGIDMap /Identity "
                   b"/CIDSystemInfo << /Registry (Adobe) /Ordering (Identity) /Supplement 0 >> "
                   b"/FontDescriptor %d 0 R /DW 1000 >>" % descriptor)
    font = add(b"<< /Type /Font /Subtype /Type0 /BaseFont /KbloopTest /Encoding /Identity-H "
               b"/DescendantFonts [%d 0 R] /ToUnicode %d 0 R >>" % (cid_font, to_unicode))
    kids = []
    for lines in pages:
        ops = ["BT", "/F1 11 Tf", "50 800 Td"]
        for i, line in enumerate(lines):
            if i:
                ops.append("0 -16 Td")
            ops.append("<" + "".join(f"{ord(c):04X}" for c in line) + "> Tj")
        ops.append("ET")
        content = add(stream("\n".join(ops).encode("ascii")))
        kids.append(add(b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 595 842] /Resources << /Font << /F1 %d 0 R >> >> "
                        b"/Contents %d 0 R >>" % (pages_id, font, content)))
    objects[catalog - 1] = b"<< /Type /Catalog /Pages %d 0 R >>" % pages_id
    objects[pages_id - 1] = (b"<< /Type /Pages /Kids [%s] /Count %d >>"
                             % (b" ".join(b"%d 0 R" % k for k in kids), len(kids)))
    info = add(b"<< /Title <FEFF%s> >>" % title.encode("utf-16-be").hex().upper().encode("ascii")) if title else None

    out = bytearray(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root %d 0 R%s >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, catalog, b" /Info %d 0 R" % info if info else b"", xref)
    path.write_bytes(bytes(out))
    return path

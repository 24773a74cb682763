"""`kbloop kb import` on Word and PDF files, in Chinese and English, and on the files a real handbook folder also
holds (images, spreadsheets, .DS_Store)."""

import json

import pytest
from pypdf import PdfWriter

from store import open_db
from tests.fakes.documents import write_docx, write_pdf
from tests.security.test_data_paths import AWS_LINE


@pytest.fixture
def workspace(kbloop):
    assert kbloop("init").exit_code == 0
    return kbloop


def _handbook(folder):
    folder.mkdir()
    write_docx(folder / "uniforms.docx", [  # saved by Chinese Word: localised style ids
        ("a3", "Uniform policy 工服规定"),
        (None, "Nurses wear navy scrubs.\nDoctors wear white coats over their own clothing."),
        ("2", "换新"),
        (None, "每位员工每年领取三套刷手服。更换请到后勤服务台填写 F-12 表。"),
        {"header": ["Role 岗位", "Colour"], "rows": [["Nurse 护士", "Navy"], ["Doctor", "White coat"]]},
        [["Locker", "Floor"], ["A1-A40", "B1"]],  # no header row marked
    ], styles={"a3": "Title", "1": "heading 1", "2": "heading 2", "a4": "Normal"})
    write_pdf(folder / "warehouse-safety.pdf", [
        ["Forklift certification", "Every forklift driver needs a valid certificate, renewed every three years."],
        ["叉车证每三年复审一次。", "未持证人员不得驾驶叉车。"],
    ], title="仓库安全手册 Warehouse safety")
    # The title a writer left behind names the file it printed from: the first line is the title instead.
    write_pdf(folder / "rota.pdf", [["Night shift rota 夜班", "Nurses rotate weekly."]], title="Microsoft Word - rota.docx")
    (folder / "floor-plan.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (folder / "rota.xlsx").write_bytes(b"PK\x03\x04")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return folder


def test_word_and_pdf_documents_are_imported_searched_and_other_files_counted(workspace, tmp_path, db_path):
    kb = _handbook(tmp_path / "handbook")
    r = workspace("kb", "import", kb)
    assert r.exit_code == 0, r.stderr
    assert "3 documents read, 3 new or changed" in r.stdout
    # Skipped files are named by type, so a folder of spreadsheets does not vanish without a word; .DS_Store is not one.
    assert (f"{kb}: 2 files of types kbloop does not read (.png 1, .xlsx 1); skipped "
            "(it reads Markdown, text, HTML, Word (.docx) or PDF)") in r.stderr
    db = open_db(db_path)
    titles = dict(db.execute("SELECT doc_path, title FROM kb_docs WHERE chunk_index = 0").fetchall())
    assert titles == {"uniforms.docx": "Uniform policy 工服规定", "warehouse-safety.pdf": "仓库安全手册 Warehouse safety",
                      "rota.pdf": "Night shift rota 夜班"}
    text = " ".join(row[0] for row in db.execute("SELECT content FROM kb_docs"))
    # Both runs of a split paragraph, the line break, and the PDF's second page, Chinese included.
    assert "Doctors wear white coats over their own clothing." in text and "更换请到后勤服务台填写 F-12 表。" in text
    assert "叉车证每三年复审一次。" in text and "renewed every three years." in text
    # A table is one block, a row a line; the row Word marks as the header is followed by a Markdown rule.
    assert "Role 岗位 | Colour\n--- | ---\nNurse 护士 | Navy\nDoctor | White coat\n\nLocker | Floor\nA1-A40 | B1" in text
    assert "\n\n## 换新\n\n" in text  # a heading, by its style's name

    hits = json.loads(workspace("kb", "search", "叉车证多久复审一次？", "--json").stdout)
    assert hits[0]["doc_path"] == "warehouse-safety.pdf"
    hits = json.loads(workspace("kb", "search", "How many sets of scrubs do I get each year?", "--json").stdout)
    assert hits[0]["doc_path"] == "uniforms.docx"


def test_unreadable_word_and_pdf_files_refuse_the_import_whole(workspace, tmp_path, db_path):
    kb = _handbook(tmp_path / "handbook")
    cases = {
        "broken.pdf": (b"%PDF-1.7\nnot really\n", "broken.pdf: not a readable PDF"),
        "broken.docx": (b"this is no zip", "broken.docx: not a readable Word document"),
    }
    for name, (data, message) in cases.items():
        (kb / name).write_bytes(data)
        r = workspace("kb", "import", kb, "--no-embed")
        assert r.exit_code == 1 and message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        (kb / name).unlink()
    write_pdf(kb / "scan.pdf", [[], []])  # pages holding no text: a scan's pages hold only images
    r = workspace("kb", "import", kb, "--no-embed")
    assert r.exit_code == 1 and "scan.pdf: the PDF has no text layer (a scanned document?)" in r.stderr
    (kb / "scan.pdf").unlink()
    locked = PdfWriter(clone_from=kb / "warehouse-safety.pdf")
    locked.encrypt(user_password="open sesame", owner_password="owner", algorithm="RC4-128")
    locked.write(kb / "locked.pdf")
    r = workspace("kb", "import", kb, "--no-embed")
    assert r.exit_code == 1 and "locked.pdf: the PDF needs a password to open" in r.stderr
    assert open_db(db_path).execute("SELECT COUNT(*) FROM kb_docs").fetchone()[0] == 0  # nothing half-imported

    # Encrypted only against printing and copying (an empty password opens it), as many published PDFs are: read.
    (kb / "locked.pdf").unlink()
    restricted = PdfWriter(clone_from=kb / "warehouse-safety.pdf")
    restricted.encrypt(user_password="", owner_password="owner", algorithm="RC4-128")
    restricted.write(kb / "restricted.pdf")
    r = workspace("kb", "import", kb, "--no-embed")
    assert r.exit_code == 0, r.stderr
    assert "4 documents read" in r.stdout


def test_secrets_in_a_word_document_are_found_and_located(workspace, tmp_path, db_path):
    kb = tmp_path / "kb"
    kb.mkdir()
    write_docx(kb / "deploy.docx", [("Title", "Deploy"), (None, "Set this first:"), (None, AWS_LINE)])
    r = workspace("kb", "import", kb, "--no-embed")
    # The line is the line of the document's text (Title, blank, paragraph, blank, the key): a .docx has no lines.
    assert r.exit_code == 1 and f"{kb / 'deploy.docx'} (line 5 of its text): secret" in r.stderr, r.stderr
    assert open_db(db_path).execute("SELECT COUNT(*) FROM kb_docs").fetchone()[0] == 0


def test_markdown_front_matter_gives_the_title_and_is_not_content(workspace, tmp_path, db_path):
    kb = tmp_path / "docs"
    kb.mkdir()
    (kb / "expenses.md").write_text('---\ntitle: "Expense policy 报销制度"\nsidebar_position: 3\ntags: [finance]\n---\n\n'
                                    "Submit receipts within 30 days.\n", encoding="utf-8")  # Docusaurus, Jekyll
    (kb / "parking.md").write_text('+++\ntitle = "Parking"\ndraft = false\n+++\n# Lot C\n\nStaff park in lot C.\n',
                                   encoding="utf-8")  # Hugo's TOML
    (kb / "vpn.md").write_text("---\nslug: /vpn\n---\n# VPN\n\nInstall WireGuard.\n", encoding="utf-8")
    (kb / "odd.md").write_text("---\ntags: [unclosed\n---\nBody text.\n", encoding="utf-8")
    (kb / "rules.md").write_text("# Rules\n\nText.\n\n---\n\nMore after a thematic break.\n", encoding="utf-8")
    assert workspace("kb", "import", kb, "--no-embed").exit_code == 0
    rows = open_db(db_path).execute("SELECT doc_path, title, content FROM kb_docs ORDER BY doc_path").fetchall()
    assert rows == [
        ("expenses.md", "Expense policy 报销制度", "Submit receipts within 30 days."),
        ("odd.md", "Body text.", "Body text."),  # front matter that does not parse is still not content
        ("parking.md", "Parking", "# Lot C\n\nStaff park in lot C."),
        ("rules.md", "Rules", "# Rules\n\nText.\n\n---\n\nMore after a thematic break."),  # a rule later is content
        ("vpn.md", "VPN", "# VPN\n\nInstall WireGuard."),  # no title in it: the first heading
    ]


def test_an_empty_page_in_a_folder_is_skipped_and_said_but_refused_when_named(workspace, tmp_path, db_path):
    """A handbook folder holds placeholder pages (an empty index.md, a page of front matter only)."""
    kb = tmp_path / "docs"
    kb.mkdir()
    (kb / "vpn.md").write_text("# VPN\n\nInstall WireGuard.\n", encoding="utf-8")
    (kb / "index.md").write_text("", encoding="utf-8")
    (kb / "todo.md").write_text("---\ntitle: To do\n---\n\n  \n", encoding="utf-8")
    r = workspace("kb", "import", kb, "--no-embed")
    assert r.exit_code == 0, r.stderr
    assert f"{kb / 'index.md'}: empty; skipped" in r.stderr and f"{kb / 'todo.md'}: empty; skipped" in r.stderr
    assert "1 document read, 1 new or changed" in r.stdout
    assert [row[0] for row in open_db(db_path).execute("SELECT doc_path FROM kb_docs")] == ["vpn.md"]
    r = workspace("kb", "import", kb / "index.md", "--no-embed")
    assert r.exit_code == 1 and "index.md: the document is empty" in r.stderr
    (kb / "vpn.md").unlink()
    r = workspace("kb", "import", kb, "--no-embed")
    assert r.exit_code == 1 and "every document found is empty" in r.stderr


def test_windows_line_ends_and_wrapped_html_read_as_a_browser_shows_them(workspace, tmp_path, db_path):
    kb = tmp_path / "docs"
    kb.mkdir()
    (kb / "parking.md").write_bytes(b"# Parking\r\n\r\nStaff park in lot B.\r\nVisitors in lot A.\r\n")  # Notepad
    (kb / "vpn.html").write_bytes(b"<html><body>\r\n<p>Install the client,\r\n   then sign in\nwith SSO.</p>\r\n"
                                  b"<pre>wg-quick up\n  office</pre></body></html>")  # an exported page, wrapped
    assert workspace("kb", "import", kb, "--no-embed").exit_code == 0
    rows = open_db(db_path).execute("SELECT doc_path, title, content FROM kb_docs ORDER BY doc_path").fetchall()
    assert rows == [("parking.md", "Parking", "# Parking\n\nStaff park in lot B.\nVisitors in lot A."),
                    ("vpn.html", "Install the client, then sign in with SSO.",
                     "Install the client, then sign in with SSO.\n\nwg-quick up\noffice")]


def test_documents_saved_in_gbk_are_read_and_latin_1_is_refused_whole(workspace, tmp_path, db_path):
    """Notepad and Word on Chinese Windows save plain text in GBK; an HTML export may say `charset=gb2312`."""
    kb = tmp_path / "docs"
    kb.mkdir()
    (kb / "仓库规定.txt").write_bytes("仓库管理规定\n\n叉车操作证每四年复审一次。\n".encode("gbk"))
    (kb / "night.html").write_bytes('<html><head><meta charset="gb2312"><title>夜班交接</title></head>'
                                    "<body><p>夜班在晚上十点交接。</p></body></html>".encode("gb2312"))
    assert workspace("kb", "import", kb, "--no-embed").exit_code == 0
    rows = open_db(db_path).execute("SELECT doc_path, title, content FROM kb_docs ORDER BY doc_path").fetchall()
    assert rows == [("night.html", "夜班交接", "夜班在晚上十点交接。"),
                    ("仓库规定.txt", "仓库管理规定", "仓库管理规定\n\n叉车操作证每四年复审一次。")]
    (kb / "cafe.md").write_bytes("# Café\n\nZwei für alle.\n".encode("latin-1"))
    r = workspace("kb", "import", kb, "--no-embed")
    assert r.exit_code == 1 and f"{kb / 'cafe.md'}:1: not UTF-8 text" in r.stderr
    assert len(open_db(db_path).execute("SELECT doc_path FROM kb_docs").fetchall()) == 2  # nothing of it imported


def test_a_document_deleted_from_the_folder_leaves_with_prune_or_remove_and_is_no_longer_found(workspace, tmp_path):
    kb = tmp_path / "kb"
    kb.mkdir()
    (kb / "vpn.md").write_text("# VPN\n\nInstall WireGuard and import the profile from the IT portal.\n", encoding="utf-8")
    (kb / "parking.md").write_text("# Parking 停车\n\nStaff park in lot C. 员工在 C 停车场停车。\n", encoding="utf-8")
    (kb / "fax.md").write_text("# Fax\n\nThe fax machine is on the second floor.\n", encoding="utf-8")
    assert workspace("teams", "add", "eng", "--channels", "C0ENG").exit_code == 0
    team_doc = tmp_path / "eng-only"
    team_doc.mkdir()
    (team_doc / "fax.md").write_text("# Eng fax\n\nEngineering has no fax.\n", encoding="utf-8")
    assert workspace("kb", "import", kb).exit_code == 0
    assert workspace("kb", "import", team_doc, "--team", "eng").exit_code == 0
    assert json.loads(workspace("kb", "search", "Where is the fax machine?", "--json").stdout)[0]["doc_path"] == "fax.md"

    (kb / "fax.md").unlink()
    r = workspace("kb", "import", kb)  # without --prune the old fax page stays, and is said to be unchanged
    assert "2 documents read" in r.stdout and "knowledge base: 4 documents" in r.stdout
    r = workspace("kb", "import", kb, "--prune")
    assert r.exit_code == 0 and "removed fax.md: not in this import (--prune)" in r.stderr
    listed = json.loads(workspace("kb", "list", "--all", "--json").stdout)
    assert [(d["doc_path"], d["team"], d["passages"]) for d in listed] == [
        ("parking.md", None, 1), ("vpn.md", None, 1), ("fax.md", "eng", 1)]  # the team's page is not the shared KB's
    assert json.loads(workspace("kb", "search", "Where is the fax machine?", "--json").stdout) == []

    r = workspace("kb", "remove", "vpn.md", "nope.md")
    assert r.exit_code == 1 and "not in the shared documents: nope.md; nothing removed" in r.stderr
    assert workspace("kb", "remove", "vpn.md").stdout.strip() == "Removed 1 document(s), 1 passage(s)."
    assert workspace("kb", "list").stdout.startswith("parking.md  Parking 停车  (1 passage, updated ")
    assert json.loads(workspace("kb", "search", "How do I set up the VPN?", "--json").stdout) == []


def test_an_exported_wiki_page_keeps_its_table_cells_apart_and_drops_navigation(workspace, tmp_path, db_path):
    kb = tmp_path / "wiki"
    kb.mkdir()
    (kb / "phones.html").write_text(
        "<html><head><title>IT : Phone list 电话</title><script>var x = 1;</script></head><body>"
        '<nav><a href="/">Home</a><a href="/spaces">Spaces</a></nav><h1>Phones</h1>'
        "<table><tr><th>Team</th><th>Phone</th></tr><tr><td>IT helpdesk</td><td>1234</td></tr>"
        "<tr><td>人事部</td><td>5678</td></tr></table><p>Call<br>any time.</p><footer>© 2025 ACME</footer></body></html>",
        encoding="utf-8")
    (kb / "menu.html").write_text("<nav><a>Home</a><p>Canteen menu: soup on Mondays.</p>", encoding="utf-8")  # unclosed
    rows = "".join(f"<tr>\n  <td>Part {i}</td>\n  <td><p>Shelf {i}</p><p>aisle {i % 7}</p></td>\n</tr>" for i in range(80))
    (kb / "parts.html").write_text(f"<h1>Parts</h1><table><caption>Where parts\n are kept</caption>"
                                   f"<thead><tr><th>Part</th><th>Where</th></tr></thead>"
                                   f"<tbody>{rows}</tbody></table>", encoding="utf-8")  # longer than a passage
    assert workspace("kb", "import", kb, "--no-embed").exit_code == 0
    content = dict(open_db(db_path).execute("SELECT doc_path, content FROM kb_docs").fetchall())
    # A table is one block, a row a line, a header row followed by a Markdown rule.
    assert content["phones.html"] == "Phones\n\nTeam | Phone\n--- | ---\nIT helpdesk | 1234\n人事部 | 5678\n\nCall\n\nany time."
    assert content["menu.html"] == "Home\n\nCanteen menu: soup on Mondays."  # nothing outside the nav: read whole
    parts = [row[0] for row in open_db(db_path).execute(
        "SELECT content FROM kb_docs WHERE doc_path = 'parts.html' ORDER BY chunk_index")]
    assert parts[0].split("\n\n")[:2] == ["Parts", "Where parts are kept"]  # the caption: a paragraph of its own
    with_rows = [p for p in parts if "| Shelf " in p]
    assert len(with_rows) > 2 and all("Part | Where\n--- | ---\nPart " in p for p in with_rows)  # each under the header
    assert [line for p in parts for line in p.split("\n") if line.startswith("Part ") and line != "Part | Where"] == [
        f"Part {i} | Shelf {i} aisle {i % 7}" for i in range(80)]

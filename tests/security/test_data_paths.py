"""Hostile data on every path into training data and the knowledge base (security review, issue 16).

Findings: 1 (a Slack correction overwrote a curated answer), 4 (the secrets scan ran in the playground's review
only), 5 (the scan missed common secrets), 6 (`kb import` followed links out of the folder), 16 (review loaded
remote images from corrections), 18 (`data import` crashed or stored anything on malformed files).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from kbloop.cli import app
from kbloop.cli.app import run
from store import open_db
from store.examples import MAX_ANSWER_CHARS, NewExample, add_examples, approved_snapshot, list_examples
from store.interactions import record_interaction, record_vote
from store.kb import kb_stats
from store.sensitive import find_sensitive

CORPUS = Path(__file__).parent / "data" / "sensitive_corpus.jsonl"
SLACK_TOKEN = "xoxb-123456789012-1234567890123-abcdefghijklmnopqrstuvwx"
AWS_LINE = "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


class Result:
    def __init__(self, code: int, out: str, err: str):
        self.exit_code, self.stdout, self.stderr = code, out, err


@pytest.fixture
def kbloop(capsys):
    def invoke(*args) -> Result:
        capsys.readouterr()
        code = run(app, [str(a) for a in args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    assert invoke("init").exit_code == 0
    return invoke


def examples_in(db_path) -> list:
    return list_examples(open_db(db_path))


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# --- Finding 18: malformed import files -----------------------------------------------------------------


def test_csv_field_over_128_kib_is_a_clear_error(kbloop, tmp_path, db_path):
    f = tmp_path / "big.csv"
    f.write_text("question,answer\nQ?,\"" + "a" * (200 * 1024) + "\"\n", encoding="utf-8")
    r = kbloop("data", "import", f)
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    assert f"{f}:2: a field is longer than" in r.stderr
    assert examples_in(db_path) == []


def test_deeply_nested_json_is_a_clear_error(kbloop, tmp_path, db_path):
    f = tmp_path / "nested.jsonl"
    f.write_text(json.dumps({"question": "Q?", "answer": "A."}) + "\n" + "[" * 200_000 + "]" * 200_000 + "\n",
                 encoding="utf-8")
    r = kbloop("data", "import", f)
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    assert f"{f}:2: JSON nested too deeply" in r.stderr
    assert examples_in(db_path) == []


def test_repeated_csv_column_is_refused(kbloop, tmp_path, db_path):
    f = tmp_path / "twice.csv"
    f.write_text("question,answer,answer\nQ?,the first,the second\n", encoding="utf-8")
    r = kbloop("data", "import", f)
    assert r.exit_code == 1
    assert f"{f}:1: column `answer` appears 2 times in the header" in r.stderr
    assert examples_in(db_path) == []


def test_nul_bytes_are_refused_raw_or_escaped(kbloop, tmp_path, db_path):
    raw = tmp_path / "raw.jsonl"
    raw.write_bytes(b'{"question": "Q1?", "answer": "A."}\n{"question": "Q2?", "answer": "A\x00B"}\n')
    r = kbloop("data", "import", raw)
    assert r.exit_code == 1 and f"{raw}:2: contains a NUL byte" in r.stderr
    escaped = jsonl(tmp_path / "escaped.jsonl", [{"question": "Q?", "answer": "A\u0000B"}])
    r = kbloop("data", "import", escaped)
    assert r.exit_code == 1 and f"{escaped}:1: `answer` contains a NUL character" in r.stderr
    assert examples_in(db_path) == []


def test_a_30_mb_answer_is_refused_with_the_limit_named(kbloop, tmp_path, db_path):
    f = jsonl(tmp_path / "huge.jsonl", [{"question": "Q?", "answer": "fine"},
                                         {"question": "Big?", "answer": "x" * (30 * 1024 * 1024)}])
    r = kbloop("data", "import", f)
    assert r.exit_code == 1
    assert f"{f}:2: the answer is 31,457,280 characters long; the limit is {MAX_ANSWER_CHARS:,}" in r.stderr
    assert examples_in(db_path) == []


# --- Finding 4: the scan on every path --------------------------------------------------------------------


def test_import_as_approved_refuses_a_file_with_secrets_whole(kbloop, tmp_path, db_path):
    f = jsonl(tmp_path / "leak.jsonl", [{"question": "VPN?", "answer": "Use WireGuard."},
                                        {"question": "Bot token?", "answer": f"It is {SLACK_TOKEN}."},
                                        {"question": "AWS?", "answer": AWS_LINE}])
    r = kbloop("data", "import", f)
    assert r.exit_code == 1
    assert f"{f}:2: contains Slack token" in r.stderr and f"{f}:3: contains secret" in r.stderr
    assert SLACK_TOKEN not in r.stderr  # the report does not spread the secret
    assert examples_in(db_path) == []


def test_import_as_pending_holds_flagged_rows_for_review(kbloop, tmp_path, db_path):
    f = jsonl(tmp_path / "leak.jsonl", [{"question": "Bot token?", "answer": f"It is {SLACK_TOKEN}."}])
    r = kbloop("data", "import", f, "--status", "pending")
    assert r.exit_code == 0 and f"{f}:1: contains Slack token" in r.stderr
    (ex,) = examples_in(db_path)
    assert ex.status == "pending"
    listed = kbloop("review")
    assert "contains Slack token" in listed.stdout
    r = kbloop("review", "approve", ex.id)
    assert r.exit_code == 1 and "Slack token" in r.stderr and "--allow-sensitive" in r.stderr
    assert examples_in(db_path)[0].status == "pending"
    assert kbloop("review", "approve", ex.id, "--allow-sensitive").exit_code == 0
    assert [e.id for e in approved_snapshot(open_db(db_path))[0]] == [ex.id]  # confirmed: it trains


def test_playground_import_scans_too(db, tmp_path):
    from playground import dataset
    from playground.auth import Viewer

    f = jsonl(tmp_path / "upload.jsonl", [{"question": "Bot token?", "answer": f"It is {SLACK_TOKEN}."}])
    out = dataset.import_file(db, Viewer(name="carol", is_admin=False), f, display_name="mine.jsonl")
    assert not out.ok and "mine.jsonl:1: contains Slack token" in out.message
    assert list_examples(db) == []


def test_exports_of_votes_leave_out_flagged_rows(kbloop, tmp_path, db_path):
    db = open_db(db_path)
    leak = record_interaction(db, question="Where is the key?", answer=f"Use {SLACK_TOKEN}.", source="slack")
    fine = record_interaction(db, question="Where is Berlin?", answer="Mitte.", source="slack")
    for iid in (leak, fine):
        record_vote(db, interaction_id=iid, user_id="U1", vote=1)
    out = tmp_path / "kto.jsonl"
    r = kbloop("data", "export", "--format", "kto", "--out", out)
    assert r.exit_code == 0 and "1 record(s) left out" in r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["prompt"] for row in rows] == ["Where is Berlin?"]
    assert SLACK_TOKEN not in out.read_text()


def test_training_start_leaves_out_flagged_approved_rows_and_says_which(db):
    from finetune.registry.split import training_split

    add_examples(db, [NewExample(f"Q{i}?", f"Answer {i}.") for i in range(5)], reviewer="alice")
    # A row approved before the scan existed (written as the old code wrote it, without a confirmation).
    db.execute("INSERT INTO examples (question, input, answer, status, source, content_hash, created_at, updated_at) "
               "VALUES ('Deploy key?', '', ?, 'approved', 'import', 'legacy', 'x', 'x')", [AWS_LINE])
    db.conn.commit()
    leaked = db.execute("SELECT id FROM examples WHERE content_hash = 'legacy'").fetchone()[0]
    examples, _ = approved_snapshot(db)
    assert leaked not in [e.id for e in examples] and len(examples) == 5
    eval_set = training_split(db, k_passages=0)
    assert f"#{leaked} contains secret" in eval_set.withheld
    assert all(AWS_LINE not in ex.answer for ex in eval_set.train + eval_set.heldout)


def test_kb_import_refuses_documents_holding_secrets(kbloop, tmp_path, db_path):
    kb = tmp_path / "kb"
    kb.mkdir()
    (kb / "ok.md").write_text("# VPN\n\nUse WireGuard.\n", encoding="utf-8")
    (kb / "deploy.md").write_text("# Deploy\n\nSet this first:\n\n" + AWS_LINE + "\n", encoding="utf-8")
    r = kbloop("kb", "import", kb, "--no-embed")
    assert r.exit_code == 1 and f"{kb / 'deploy.md'}:5: secret" in r.stderr
    assert kb_stats(open_db(db_path))["documents"] == 0  # nothing half-imported


# --- Finding 6: links out of the imported folder ----------------------------------------------------------


def test_kb_import_does_not_follow_links_out_of_the_folder(kbloop, tmp_path, db_path):
    (tmp_path / ".env").write_text("SLACK_SIGNING_SECRET=8f742231b10e8888abcd99aaa6885a5c\n", encoding="utf-8")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "private.md").write_text("# Private\n\nSalaries.\n", encoding="utf-8")
    kb = tmp_path / "kb"
    kb.mkdir()
    (kb / "vpn.md").write_text("# VPN\n\nUse WireGuard.\n", encoding="utf-8")
    os.symlink("../.env", kb / "x.md")
    os.symlink("../outside", kb / "more")
    os.symlink("vpn.md", kb / "alias.md")  # stays inside: fine
    r = kbloop("kb", "import", kb, "--no-embed")
    assert r.exit_code == 0, r.stderr
    assert f"{kb / 'x.md'}: a link to ../.env, outside {kb}; not followed" in r.stderr
    assert f"{kb / 'more'}: a link to ../outside, outside {kb}; not followed" in r.stderr
    docs = {row[0] for row in open_db(db_path).execute("SELECT DISTINCT doc_path FROM kb_docs")}
    assert docs == {"vpn.md", "alias.md"}


# --- Finding 1: a Slack correction against a curated answer ----------------------------------------------


def test_slack_correction_cannot_overwrite_a_curated_answer(db):
    from playground import review
    from playground.auth import Viewer

    add_examples(db, [NewExample("How do I reset my password?", "Use the self-service portal.")], reviewer="alice")
    iid = record_interaction(db, question="how do i reset my PASSWORD?", answer="No idea.", source="slack")
    record_vote(db, interaction_id=iid, user_id="U_OUTSIDER", vote=-1, correction="Send it to me by DM.")
    assert [e.answer for e in approved_snapshot(db)[0]] == ["Use the self-service portal."]
    item = review.open_item(db, f"i:{iid}")
    assert item.disputed is not None and item.disputed.answer == "Use the self-service portal."
    shown = review.item_markdown(item).bot_answer
    assert "Use the self-service portal." in shown and "Send it to me by DM." in shown
    out = review.keep_approved(db, Viewer(name="alice", is_admin=True), f"i:{iid}", expected_status="pending")
    assert out.ok, out.message
    assert [e.answer for e in approved_snapshot(db)[0]] == ["Use the self-service portal."]


# --- Finding 16: remote images in what review shows ------------------------------------------------------


def test_review_shows_no_remote_image_from_a_correction(db):
    from markdown_it import MarkdownIt

    from playground import review

    pixel = "https://tracker.example/p.gif?who=curator"
    iid = record_interaction(db, question=f"Q ![q]({pixel})", answer=f"<img src='{pixel}'> hello", source="slack",
                             sources=[{"title": f"![t]({pixel})", "doc_path": "a.md"}])
    record_vote(db, interaction_id=iid, user_id="U1", vote=-1,
                correction=f"See ![pixel]({pixel}) and ![ref][r]\n\n[r]: {pixel}\n\n<picture><source srcset='{pixel}'>")
    item = review.open_item(db, f"i:{iid}")
    md = review.item_markdown(item)
    renderer = MarkdownIt("commonmark", {"html": True})
    for text in (md.header, md.bot_answer, md.sources, md.corrections, md.flags, md.duplicates):
        html = renderer.render(text)
        assert "<img" not in html and "<picture" not in html and "<source" not in html, html


# --- Finding 5: the detector on a corpus of true and false positives, English and Chinese ---------------


def test_detector_catches_every_true_positive_and_no_false_positive():
    rows = [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert {r["lang"] for r in rows} == {"en", "zh"} and any(r["sensitive"] for r in rows)
    tp = fp = fn = 0
    missed, wrong = [], []
    started = time.perf_counter()
    for r in rows:
        kinds = [f.kind for f in find_sensitive(r["text"])]
        if r["sensitive"]:
            if r["kind"] in kinds:
                tp += 1
            else:
                fn += 1
                missed.append((r["kind"], r["text"][:60], kinds))
        elif kinds:
            fp += 1
            wrong.append((r["text"][:60], kinds))
    ms_per_row = (time.perf_counter() - started) * 1000 / len(rows)
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    print(f"\nsensitive corpus: {len(rows)} rows, precision {precision:.3f}, recall {recall:.3f}, "
          f"{ms_per_row:.2f} ms/row (first scan)")
    assert not missed, missed
    assert not wrong, wrong

"""The data commands on real files, including every kind of bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SAMPLES


@pytest.fixture
def workspace(kbloop):
    assert kbloop("init").exit_code == 0
    return kbloop


def test_init_creates_home_database_and_env_example(kbloop, kbloop_home):
    r = kbloop("init")
    assert r.exit_code == 0, r.stderr
    assert (kbloop_home / "kbloop.db").exists()
    assert "KBLOOP_BASE_MODEL" in (kbloop_home / ".env.example").read_text()
    assert kbloop("init").exit_code == 0  # idempotent


def test_commands_before_init_say_what_to_do(kbloop):
    r = kbloop("data", "stats")
    assert r.exit_code == 1 and "run `kbloop init` first" in r.stderr


def test_every_command_has_help(kbloop):
    for cmd in (["init"], ["kb", "import"], ["kb", "list"], ["kb", "remove"], ["kb", "search"], ["data", "import"], ["data", "export"], ["data", "stats"], ["review"],
                ["review", "approve"], ["review", "reject"], ["db", "backup"]):
        r = kbloop(*cmd, "--help")
        assert r.exit_code == 0 and "Usage" in r.stdout, cmd


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_bad_jsonl_is_refused_whole_with_file_line_reasons(workspace, tmp_path):
    bad = _write(tmp_path / "qa.jsonl", [
        json.dumps({"instruction": "Good one?", "input": "", "output": "Yes."}),
        '{"instruction": "broken",',
        json.dumps({"instruction": "No answer", "input": ""}),
        json.dumps({"instruction": "Empty answer", "output": "  "}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"prompt": "x", "response": "y"}),
    ])
    r = workspace("data", "import", bad)
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert [line.removeprefix(f"kbloop: {bad}:").split(":")[0] for line in lines] == ["2", "3", "4", "5", "6"]
    assert "broken JSON" in lines[0]
    assert "missing or empty `output`" in lines[1] and "missing or empty `output`" in lines[2]
    assert "expected a JSON object" in lines[3]
    assert "unknown format" in lines[4]
    assert "examples by status: pending 0, approved 0" in workspace("data", "stats").stdout.lower()


def test_bad_csv_is_refused_whole(workspace, tmp_path):
    bad = tmp_path / "qa.csv"
    bad.write_text('question,answer\n"What is SSO?","Okta"\n"No answer",\n', encoding="utf-8")
    r = workspace("data", "import", bad)
    assert r.exit_code == 1 and f"{bad}:3: missing or empty `answer`" in r.stderr
    good = tmp_path / "ok.csv"
    good.write_text('instruction,input,output\n"What is SSO?",,"Okta, via the portal"\n', encoding="utf-8")
    r = workspace("data", "import", good)
    assert r.exit_code == 0 and "1 example imported" in r.stdout


ZH_PREAMBLE = "请根据公司知识库回答以下问题:"


def _export(workspace, tmp_path, fmt: str) -> list[dict]:
    out = tmp_path / f"{fmt}.jsonl"
    assert workspace("data", "export", "--format", fmt, "--out", out).exit_code == 0
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def test_guide_layout_import_says_so_and_stores_the_bare_question(workspace, tmp_path):
    guide = _write(tmp_path / "guide.jsonl", [json.dumps(r, ensure_ascii=False) for r in [
        {"instruction": ZH_PREAMBLE, "input": "我们的报销流程是什么?", "output": "在费控系统提交申请并附上发票。"},
        {"instruction": ZH_PREAMBLE, "input": "年假有多少天?", "output": "每年 15 天。"},
    ]])
    r = workspace("data", "import", guide)
    assert r.exit_code == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"{guide}: 2 examples imported as approved, 0 duplicates skipped.",
        f'Read as: question = input; the instruction is the same on every row: "{ZH_PREAMBLE}"',
    ]
    sft = _export(workspace, tmp_path, "sft")
    assert sorted((e["instruction"], e["input"]) for e in sft) == [("年假有多少天?", ""), ("我们的报销流程是什么?", "")]
    # What training and answering both see: the employee's bare question, no preamble.
    users = {m["messages"][0]["content"] for m in _export(workspace, tmp_path, "messages")}
    assert users == {"我们的报销流程是什么?", "年假有多少天?"}


def test_english_csv_in_both_layouts(workspace, tmp_path):
    preamble = "Answer the following question using the company knowledge base."
    guide = tmp_path / "guide.csv"
    guide.write_text(f'instruction,input,output\n"{preamble}","How do I file expenses?","In the expenses tool."\n'
                     f'"{preamble}","How many leave days?","28 a year."\n', encoding="utf-8")
    r = workspace("data", "import", guide)
    assert r.exit_code == 0 and f'the instruction is the same on every row: "{preamble}"' in r.stdout
    alpaca = tmp_path / "alpaca.csv"
    alpaca.write_text('instruction,input,output\n"Who approves travel?","Berlin office","Your team lead."\n'
                      '"Where is the Berlin office?",,"Mitte."\n', encoding="utf-8")
    r = workspace("data", "import", alpaca)
    assert r.exit_code == 0 and "Read as: question = instruction, context = input (Alpaca layout)" in r.stdout
    sft = {(e["instruction"], e["input"]) for e in _export(workspace, tmp_path, "sft")}
    assert ("Who approves travel?", "Berlin office") in sft and ("How do I file expenses?", "") in sft


def test_field_options_override_detection_and_unknown_fields_are_named(workspace, tmp_path):
    custom = _write(tmp_path / "custom.jsonl", [json.dumps({"ask": "Where is Berlin's office?", "reply": "Mitte."})])
    assert "unknown format" in workspace("data", "import", custom).stderr
    r = workspace("data", "import", custom, "--question-field", "ask", "--answer-field", "reply")
    assert r.exit_code == 0, r.stderr
    assert "1 example imported" in r.stdout and "Read as: question = ask, answer = reply" in r.stdout
    r = workspace("data", "import", custom, "--question-field", "prompt", "--answer-field", "reply")
    assert r.exit_code == 1
    assert r.stderr.strip() == f"kbloop: {custom}: no field `prompt` in the file (fields: ask, reply)"
    # Forcing input/output on a file detection reads Alpaca-style (a single row shares no preamble).
    row = {"instruction": ZH_PREAMBLE, "input": "VPN 怎么连?", "output": "WireGuard。"}
    one = _write(tmp_path / "one.jsonl", [json.dumps(row, ensure_ascii=False)])
    r = workspace("data", "import", one, "--question-field", "input", "--answer-field", "output")
    assert r.exit_code == 0 and "Read as: question = input, answer = output" in r.stdout
    assert "VPN 怎么连?" in {e["instruction"] for e in _export(workspace, tmp_path, "sft")}


def test_guide_file_with_a_bad_line_is_refused_whole(workspace, tmp_path):
    bad = _write(tmp_path / "guide.jsonl", [json.dumps(r, ensure_ascii=False) for r in [
        {"instruction": ZH_PREAMBLE, "input": "报销流程?", "output": "费控系统。"},
        {"instruction": ZH_PREAMBLE, "input": "", "output": "没有问题的答案。"},
        {"instruction": ZH_PREAMBLE, "input": "年假?", "output": ""},
        {"instruction": ZH_PREAMBLE, "input": "VPN?", "output": "WireGuard。"},
    ]])
    r = workspace("data", "import", bad)
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [
        f'kbloop: {bad}:2: empty `input`: rows with the shared instruction "{ZH_PREAMBLE}" ask their question there',
        f"kbloop: {bad}:3: missing or empty `output`"]
    assert "examples by status: pending 0, approved 0" in workspace("data", "stats").stdout.lower()


def test_unknown_file_type_missing_path_and_non_utf8(workspace, tmp_path):
    assert "unknown file type .xls;" in workspace("data", "import", _write(tmp_path / "a.xls", ["x"])).stderr
    assert "no such file" in workspace("data", "import", tmp_path / "missing.jsonl").stderr
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"question": "caf\xe9?", "answer": "oui"}\n'.encode("latin-1"))
    r = workspace("data", "import", latin)
    assert r.exit_code == 1 and f"{latin}:1: not UTF-8" in r.stderr
    doc = tmp_path / "doc.md"
    doc.write_bytes("# Caf\xe9\n".encode("latin-1"))
    r = workspace("kb", "import", doc, "--no-embed")
    assert r.exit_code == 1 and "not UTF-8" in r.stderr
    assert "no such file or folder" in workspace("kb", "import", tmp_path / "nope").stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(workspace, tmp_path):
    f = _write(tmp_path / "secret.jsonl", ['{"question": "q", "answer": "a"}'])
    f.chmod(0)
    assert "not readable" in workspace("data", "import", f).stderr


def test_reimport_skips_duplicates_and_says_how_many(workspace):
    qa = SAMPLES / "qa.jsonl"
    first = workspace("data", "import", qa)
    assert first.exit_code == 0, first.stderr
    n = sum(1 for line in qa.read_text(encoding="utf-8").splitlines() if line.strip())
    added = int(first.stdout.split(": ")[1].split()[0])
    assert 0 < added <= n  # near-duplicates in the sample data collapse
    second = workspace("data", "import", qa)
    assert f"0 examples imported as approved, {n} duplicates skipped" in second.stdout


def test_sample_workflow_and_exports_load_with_datasets(workspace, tmp_path):
    datasets = pytest.importorskip("datasets")
    assert workspace("kb", "import", SAMPLES / "kb", "--no-embed").exit_code == 0
    stats = json.loads(workspace("data", "stats", "--json").stdout)
    assert stats["knowledge_base"]["documents"] >= 20
    assert workspace("data", "import", SAMPLES / "qa.jsonl").exit_code == 0
    expected = {"sft": ["instruction", "input", "output"], "messages": ["messages"],
                "dpo": ["prompt", "chosen", "rejected"], "kto": ["prompt", "completion", "label"]}
    # Feedback so that the preference formats are not empty.
    from store import open_db
    from store.examples import list_examples, review_example
    from store.interactions import record_interaction, record_vote

    db = open_db(os.environ["KBLOOP_HOME"] + "/kbloop.db")
    iid = record_interaction(db, question="Where is the Berlin office?", answer="In Paris.", source="slack")
    record_vote(db, interaction_id=iid, user_id="U1", vote=-1, correction="In Berlin-Mitte.")
    iid2 = record_interaction(db, question="Payroll date?", answer="The 25th.", source="slack")
    record_vote(db, interaction_id=iid2, user_id="U2", vote=1)
    review_example(db, list_examples(db, status="pending")[0].id, decision="approved", reviewer="t")
    for fmt, columns in expected.items():
        out = tmp_path / f"{fmt}.jsonl"
        r = workspace("data", "export", "--format", fmt, "--out", out)
        assert r.exit_code == 0, r.stderr
        ds = datasets.load_dataset("json", data_files=str(out), split="train")
        assert ds.column_names == columns, fmt
        assert len(ds) >= 1
    kto = datasets.load_dataset("json", data_files=str(tmp_path / "kto.jsonl"), split="train")
    assert sorted(kto["label"]) == [False, True]
    assert workspace("data", "export", "--format", "alpaca", "--out", tmp_path / "x").exit_code == 1


def test_export_as_trained_writes_the_prompts_training_sees_for_trl_and_llama_factory(workspace, tmp_path):
    """To train elsewhere an adapter that kbloop serves, the prompts must be kbloop's: system prompt, passages."""
    datasets = pytest.importorskip("datasets")
    from finetune.model.prompting import SYSTEM_PROMPT

    kb = tmp_path / "kb"
    kb.mkdir()
    (kb / "vpn.md").write_text("# VPN\n\nInstall the WireGuard client, then sign in with SSO.\n", encoding="utf-8")
    (kb / "leave.md").write_text("# 年假\n\n员工每年有二十五天年假。\n", encoding="utf-8")
    (kb / "canteen.md").write_text("# Canteen\n\nLunch is served from 11:30 to 13:30.\n", encoding="utf-8")
    assert workspace("kb", "import", kb).exit_code == 0
    qa = _write(tmp_path / "qa.jsonl", [json.dumps({"question": q, "answer": a}, ensure_ascii=False) for q, a in (
        ("How do I connect to the VPN from my laptop?", "Install the client, then sign in with SSO."),
        ("年假有多少天？", "每年二十五天。"))])
    assert workspace("data", "import", qa).exit_code == 0
    out = tmp_path / "messages.jsonl"
    r = workspace("data", "export", "--format", "messages", "--as-trained", "--passages", "2", "--out", out)
    assert r.exit_code == 0 and "2 messages records written" in r.stdout and "with 2 passages per prompt" in r.stdout
    records = datasets.load_dataset("json", data_files=str(out), split="train")["messages"]
    for (system, user, assistant), question in zip(records, ("How do I connect", "年假有多少天？")):
        assert (system["role"], system["content"]) == ("system", SYSTEM_PROMPT)
        assert user["content"].startswith("Knowledge base:\n[1] ") and "\n\n[2] " in user["content"]
        assert user["content"].split("Question: ")[1].startswith(question)
        assert assistant["role"] == "assistant"
    out = tmp_path / "sft.jsonl"
    assert workspace("data", "export", "--format", "sft", "--as-trained", "--passages", "2", "--out", out).exit_code == 0
    sft = datasets.load_dataset("json", data_files=str(out), split="train")
    assert sft.column_names == ["system", "instruction", "input", "output", "history"]
    assert sft["instruction"] == [m[1]["content"] for m in records] and sft["history"] == [[], []]
    r = workspace("data", "export", "--format", "kto", "--as-trained", "--out", tmp_path / "kto.jsonl")
    assert r.exit_code == 1 and "--as-trained writes sft or messages records, not 'kto'" in r.stderr
    r = workspace("data", "export", "--format", "sft", "--passages", "2", "--out", tmp_path / "x.jsonl")
    assert r.exit_code == 1 and "--passages goes with --as-trained" in r.stderr


def test_backup_is_a_consistent_copy(workspace, tmp_path):
    workspace("data", "import", SAMPLES / "qa.jsonl")
    out = tmp_path / "backup.db"
    assert workspace("db", "backup", out).exit_code == 0
    import sqlite3

    conn = sqlite3.connect(out)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("SELECT COUNT(*) FROM examples").fetchone()[0] > 200
    assert "already exists" in workspace("db", "backup", out).stderr


def test_review_approve_and_reject(workspace):
    from store import open_db
    from store.interactions import record_interaction, record_vote

    db = open_db(os.environ["KBLOOP_HOME"] + "/kbloop.db")
    for i, uid in enumerate(["U1", "U2"]):
        iid = record_interaction(db, question=f"Question {i}?", answer="wrong", source="slack")
        record_vote(db, interaction_id=iid, user_id=uid, vote=-1, correction=f"right {i}")
    listing = workspace("review").stdout
    assert "Question 0?" in listing and "right 1" in listing
    r = workspace("review", "approve", "1", "--answer", "Edited right answer")
    assert r.exit_code == 0 and "approved" in r.stdout
    assert workspace("review", "reject", "2").exit_code == 0
    assert "No pending examples." in workspace("review").stdout
    assert "Edited right answer" in workspace("review", "--status", "approved").stdout
    assert "no example with id 99" in workspace("review", "approve", "99").stderr


def test_review_shows_and_approves_a_correction_that_disputes_an_approved_example(workspace, kbloop_home):
    from store import open_db
    from store.examples import NewExample, add_examples, get_example
    from store.interactions import record_interaction, record_vote

    db = open_db(kbloop_home / "kbloop.db")
    add_examples(db, [NewExample("Where is the Berlin office?", "Torstraße 1.")], reviewer="alice")
    iid = record_interaction(db, question="where is the berlin office?", answer="Munich.", source="slack")
    record_vote(db, interaction_id=iid, user_id="U1", vote=-1, correction="Torstraße 1, Mitte.")
    listing = workspace("review").stdout
    assert "#2 [feedback (answer #1)]" in listing and "disputes #1 (approved): Torstraße 1." in listing
    r = workspace("review", "approve", "2")
    assert r.exit_code == 0 and "#2 approved (replaces #1)" in r.stdout
    assert get_example(db, 1).status == "rejected"


def test_bad_setting_is_one_line_naming_the_variable(kbloop, monkeypatch):
    monkeypatch.setenv("KBLOOP_PLAYGROUND_AUTH", "alice")
    r = kbloop("init")
    assert r.exit_code == 1
    assert r.stderr.strip().startswith("kbloop: KBLOOP_PLAYGROUND_AUTH: expected user:password pairs")
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_console_script_from_a_shell(tmp_path):
    """The installed `kbloop` script, as a user runs it: exit codes and no traceback."""
    exe = Path(sys.executable).parent / "kbloop"
    env = {**os.environ, "KBLOOP_HOME": str(tmp_path / "h")}
    ok = subprocess.run([exe, "init"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([exe, "data", "import", str(tmp_path / "none.jsonl")], env=env, capture_output=True,
                         text=True, cwd=tmp_path)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and "no such file" in bad.stderr

"""The dataset tab's handlers: browse, edit, import with the CLI's validation, export, statistics."""

import json

from playground import dataset
from store.examples import get_example, list_examples


def test_table_search_and_edit(db, seeded, alice):
    table = dataset.examples_table(db, search="Berlin")
    assert table["question"].tolist() == ["Where is the Berlin office?"]
    ex_id = int(table["id"][0])
    out = dataset.save_example(db, alice, ex_id, question="Where is the Berlin office?", answer="Torstraße 1, 10119 Berlin.")
    assert out.ok
    ex = get_example(db, ex_id)
    assert ex.answer == "Torstraße 1, 10119 Berlin." and ex.reviewer == "alice"
    refused = dataset.save_example(db, alice, ex_id, question="x", answer="mail me at a.b@example.com")
    assert not refused.ok and "e-mail address" in refused.message
    assert not dataset.save_example(db, alice, ex_id, question="如何申请年假", answer="dup").ok  # would collide
    assert dataset.remove_example(db, alice, ex_id).ok
    assert get_example(db, ex_id).status == "rejected"


def test_import_reports_file_line_with_the_uploaded_name(db, alice, tmp_path):
    bad = tmp_path / "upload-1234.jsonl"
    bad.write_text('{"question": "Q1", "answer": "A1"}\n{"question": "Q2"}\nnot json\n', encoding="utf-8")
    out = dataset.import_file(db, alice, bad, display_name="faq.jsonl")
    assert not out.ok
    assert "faq.jsonl:2: missing or empty `answer`" in out.message and "faq.jsonl:3: broken JSON" in out.message
    assert str(tmp_path) not in out.message
    assert list_examples(db) == []  # nothing half-imported
    good = tmp_path / "faq.csv"
    good.write_text("question,answer\nQ1,A1\nQ2,A2\n", encoding="utf-8")
    out = dataset.import_file(db, alice, good)
    assert out.ok and "2 examples imported as approved" in out.message
    assert {e.reviewer for e in list_examples(db)} == {"alice"}


def test_import_says_how_the_file_was_read(db, alice, tmp_path):
    preamble = "请根据公司知识库回答以下问题:"
    guide = tmp_path / "guide.jsonl"
    guide.write_text("".join(json.dumps({"instruction": preamble, "input": q, "output": "见 HR 门户。"}, ensure_ascii=False)
                             + "\n" for q in ("我们的报销流程是什么?", "年假有多少天?")), encoding="utf-8")
    out = dataset.import_file(db, alice, guide)
    assert out.ok and out.message.splitlines()[1] == (
        f'Read as: question = input; the instruction is the same on every row: "{preamble}"')
    assert sorted(e.question for e in list_examples(db)) == ["年假有多少天?", "我们的报销流程是什么?"]


def test_export_every_format(db, seeded, alice, tmp_path):
    from playground import review

    review.approve(db, alice, f"i:{seeded['vpn']}", answer="Install WireGuard.")
    counts = {}
    for fmt in ("sft", "messages", "dpo", "kto"):
        path, out = dataset.export_file(db, fmt, out_dir=tmp_path)
        assert out.ok
        lines = [json.loads(line) for line in open(path, encoding="utf-8")]
        counts[fmt] = len(lines)
    assert counts == {"sft": 3, "messages": 3, "dpo": 1, "kto": 4}
    assert not dataset.export_file(db, "parquet", out_dir=tmp_path)[1].ok


def test_statistics_and_growth(db, seeded):
    assert "| 3 | 2 | 1 | 0 |" in dataset.stats_markdown(db)
    growth = dataset.growth_frame(db)
    assert set(growth["source"]) == {"import", "total"} and growth["examples"].max() == 2
    comp = dataset.composition_frame(db)
    assert dict(zip(comp["group"], comp["count"]))["status: pending"] == 1


def test_growth_of_an_empty_dataset_is_an_empty_frame(db):
    assert dataset.growth_frame(db).empty and list(dataset.growth_frame(db).columns) == ["day", "examples", "source"]

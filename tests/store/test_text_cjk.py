"""The CJK script ranges live once, in store.text, and every module that asks "is this Chinese?" uses them."""

import re
from pathlib import Path

import pytest

from store import text

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("store", "finetune", "bot", "playground", "kbloop", "bench")
# How a copy of a range would be written: an escape or the character itself at the start of the main block.
RANGE_SPELLINGS = re.compile(r"\\u4e00|\\U00004e00|\\x{4e00}|0x4e00|\u4e00-", re.IGNORECASE)


def test_the_cjk_ranges_are_defined_once():
    copies = [
        str(path.relative_to(REPO))
        for package in PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
        if RANGE_SPELLINGS.search(path.read_text(encoding="utf-8"))
    ]
    assert copies == ["store/text.py"]


def test_every_module_uses_the_store_definition():
    from finetune.evaluation import metrics as evaluation
    from finetune.serving import answers, retrieval
    from finetune.training import recommend

    assert evaluation.CJK_CHAR is text.CJK_CHAR
    assert answers.CJK_CHAR is text.CJK_CHAR
    assert recommend.CJK_CHAR is text.CJK_CHAR
    assert retrieval.CJK_CHAR is text.CJK_CHAR
    assert retrieval.CJK_RUN is text.CJK_RUN


@pytest.mark.parametrize(
    "char, block",
    [
        ("中", "CJK Unified Ideographs"),
        ("\u3400", "Extension A"),
        ("\uf900", "compatibility ideographs"),  # the block recommend.py's copy used to miss
        ("\U00020000", "Extension B"),
        ("か", "hiragana"),
        ("한", "hangul"),
    ],
)
def test_cjk_letters_are_recognised(char, block):
    assert text.CJK_CHAR.fullmatch(char), block


@pytest.mark.parametrize("char", ["。", "、", "「", "，", "！", "？", "：", "（"])
def test_cjk_punctuation_is_punctuation_not_letters(char):
    assert re.fullmatch(f"[{text.CJK_PUNCTUATION}]", char)
    assert not text.CJK_CHAR.match(char)  # a run of CJK letters ends at it


@pytest.mark.parametrize("char", ["a", "Z", "1", ".", "é", "Ａ"])
def test_latin_is_neither(char):
    assert not text.CJK_CHAR.match(char)
    assert not re.fullmatch(f"[{text.CJK_PUNCTUATION}]", char)


def test_recommend_counts_a_compatibility_ideograph_as_cjk():
    from finetune.training.recommend import CJK_CHAR

    assert CJK_CHAR.findall("豈更車") == list("豈更車")  # U+F900-U+F902


def test_a_chinese_sentence_is_joined_to_the_next_without_a_space():
    from store.documents import chunk_text

    chunks = chunk_text("标题", "第一句话。" * 80 + "第二段！" * 80, max_chars=300)
    assert all(" " not in c for c in chunks)


def test_a_sentence_longer_than_a_passage_is_cut_at_lines_then_clauses_then_the_limit():
    """Text with no full stop between blank lines was one passage however long: a 120-row table, Chinese with
    commas only, a 5,000-character link, 30,000 characters of unpunctuated Chinese."""
    from store.documents import chunk_text

    table = "\n".join(f"| Part {i} | Shelf {i} |" for i in range(120))  # rows without a header: a list of lines
    commas = "，".join(f"第{i}条规定员工需要遵守仓库的安全规则" for i in range(100)) + "。"
    link = "See https://wiki.example.com/" + "a" * 5000 + " for details"
    unbroken = "仓库管理规定叉车操作证每四年复审一次" * 1600
    for long_text in (table, commas, link, unbroken):
        chunks = chunk_text("T", long_text, max_chars=700)
        assert len(chunks) >= len(long_text) // 700 and all(len(c) <= 700 for c in chunks)
        assert "".join("".join(c.split()) for c in chunks) == "".join(long_text.split())  # nothing lost, nothing added
    rows = chunk_text("T", table, max_chars=700)
    assert all(line.startswith("|") for c in rows for line in c.split("\n"))  # cut between rows, rows whole
    clauses = chunk_text("T", commas, max_chars=700)
    assert all(c.endswith(("，", "。")) for c in clauses) and " " not in "".join(clauses)  # Chinese joined without spaces


def test_a_long_paragraph_is_cut_between_sentences_not_inside_numbers_and_host_names():
    from store.documents import chunk_text

    para = " ".join(["Install version 3.14 from ledgr.nwl.internal, e.g. on Windows."] * 20 + ["安装完成。重启电脑！"] * 5)
    chunks = chunk_text("T", para, max_chars=300)
    assert len(chunks) > 1 and all(len(c) <= 300 for c in chunks)
    text = " ".join(chunks)
    assert text.count("version 3.14 from ledgr.nwl.internal, e.g. on Windows.") == 20 and "3. 14" not in text
    assert "安装完成。重启电脑！" in text


def test_a_long_markdown_table_is_cut_between_rows_each_piece_under_its_header():
    from store.documents import chunk_text

    header = "| 岗位 Role | Colour | Notes |\n|---|:---:|---|"
    rows = [f"| Role {i} | {('navy', 'white', 'green')[i % 3]} | Shift {i % 4}, rule 3.{i} applies. |" for i in range(60)]
    chunks = chunk_text("Uniforms", "Intro.\n\n" + header + "\n" + "\n".join(rows), max_chars=700)
    with_rows = [c for c in chunks if "| Role " in c]
    assert len(with_rows) > 2 and all(len(c) <= 700 for c in chunks)
    assert all(header + "\n| Role " in c for c in with_rows)  # each piece of the table starts with its header
    assert [line for c in chunks for line in c.split("\n") if line.startswith("| Role ")] == rows  # once, whole, in order

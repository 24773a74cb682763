"""Reading training-data files: which layout a file uses, decided per file, and how it is reported."""

import json
from pathlib import Path

import pytest

from store import StoreError
from store.examples import NewExample, add_examples, list_examples
from store.formats import ImportFileError, read_examples_file

ZH_PREAMBLE = "请根据公司知识库回答以下问题:"
EN_PREAMBLE = "Answer the following question using the company knowledge base."


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _guide(preamble: str, pairs: list[tuple[str, str]]) -> list[dict]:
    return [{"instruction": preamble, "input": q, "output": a} for q, a in pairs]


def test_guide_layout_in_chinese_reads_the_question_from_input_and_drops_the_preamble(tmp_path):
    rows = _guide(ZH_PREAMBLE, [("我们的报销流程是什么?", "在费控系统提交申请并附上发票。"),
                                ("年假有多少天?", "每年 15 天。"), ("VPN 怎么连?", "安装 WireGuard。")])
    # Retyped by hand: other spacing and a full-width colon are still the same preamble.
    rows[1]["instruction"] = " 请根据公司知识库回答以下问题： "
    f = read_examples_file(_jsonl(tmp_path / "zh.jsonl", rows))
    assert f.layout == "guide"
    assert f.examples[0] == NewExample(question="我们的报销流程是什么?", answer="在费控系统提交申请并附上发票。", input="")
    assert [e.question for e in f.examples] == ["我们的报销流程是什么?", "年假有多少天?", "VPN 怎么连?"]
    assert {e.input for e in f.examples} == {""}
    assert f.description == f'question = input; the instruction is the same on every row: "{ZH_PREAMBLE}"'


def test_guide_layout_in_english_csv(tmp_path):
    path = tmp_path / "en.csv"
    path.write_text("instruction,input,output\n"
                    f'"{EN_PREAMBLE}","How do I file expenses?","In the expenses tool, with receipts."\n'
                    f'"{EN_PREAMBLE}","How many leave days do I get?","28 days a year."\n', encoding="utf-8")
    f = read_examples_file(path)
    assert f.layout == "guide"
    assert [(e.question, e.input) for e in f.examples] == [("How do I file expenses?", ""),
                                                           ("How many leave days do I get?", "")]
    assert EN_PREAMBLE in f.description


def test_a_json_array_as_the_guide_and_alpaca_ship_it_is_read_with_each_record_s_line(tmp_path):
    # What `json.dump(rows, f, ensure_ascii=False, indent=2)` writes: the guide's data file, Alpaca's alpaca_data.json.
    rows = _guide(ZH_PREAMBLE, [("诊所周六几点开门?", "9:00 开门。"), ("How many sets of scrubs a year?", "Three."),
                                ("过期药品怎么处理?", "周五交药剂科销毁。")])
    path = tmp_path / "guide.json"
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    f = read_examples_file(path)
    assert f.layout == "guide"
    assert [e.question for e in f.examples] == ["诊所周六几点开门?", "How many sets of scrubs a year?", "过期药品怎么处理?"]
    assert f.lines == (2, 7, 12)  # where each record's `{` is
    rows[1]["output"] = ""
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    with pytest.raises(ImportFileError) as err:
        read_examples_file(path)
    assert err.value.problems == [f"{path}:7: missing or empty `output`"]


def test_a_json_array_on_one_line_names_the_record_and_numbers_are_answers(tmp_path):
    """`json.dump(rows, f)` without indent puts every record on line 1; a number answers as a spreadsheet's does."""
    path = tmp_path / "qa.json"
    rows = [{"question": "How many days of leave?", "answer": 25}, {"question": "Open on Sunday?", "answer": False},
            {"question": "Floor of the canteen?", "answer": None}, {"question": "VAT rate?", "answer": 19.5}]
    path.write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(ImportFileError) as err:
        read_examples_file(path)
    assert err.value.problems == [f"{path}:1: record 2: `answer` must be text, got bool",
                                  f"{path}:1: record 3: missing or empty `answer`"]
    path.write_text(json.dumps([rows[0], rows[3]]), encoding="utf-8")
    assert [e.answer for e in read_examples_file(path).examples] == ["25", "19.5"]


@pytest.mark.parametrize("text, problem", [
    ('[\n {"question": "A?", "answer": "B."},\n {"question": "C?" "answer": "D."}\n]\n',
     "3: broken JSON (Expecting ',' delimiter at column 20)"),
    ('[\n {"question": "A?", "answer": "B."}\n {"question": "C?", "answer": "D."}\n]',
     "3: broken JSON (expected , or ] after the record that starts on line 2)"),
    ('[\n {"question": "A?", "answer": "B."},\n', "3: broken JSON (Expecting value at column 1)"),
    ('[{"question": "A?", "answer": "B."}]\n{"question": "C?", "answer": "D."}\n',
     "2: text after the JSON array ends; a file holds one array of records, or one record per line (JSONL)"),
])
def test_a_broken_json_array_is_refused_whole_naming_the_line(tmp_path, text, problem):
    path = tmp_path / "broken.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ImportFileError) as err:
        read_examples_file(path)
    assert err.value.problems == [f"{path}:{problem}"]


def test_alpaca_layout_keeps_instruction_as_question_and_input_as_context(tmp_path):
    f = read_examples_file(_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "How do I file expenses?", "input": "", "output": "In the expenses tool."},
        {"instruction": "年假有多少天?", "input": "上海办公室", "output": "每年 15 天。"},
    ]))
    assert f.layout == "alpaca"
    assert f.description == "question = instruction, context = input (Alpaca layout)"
    assert [(e.question, e.input) for e in f.examples] == [("How do I file expenses?", ""), ("年假有多少天?", "上海办公室")]
    csv = tmp_path / "alpaca.csv"
    csv.write_text('instruction,input,output\n"Who approves travel?",,"Your team lead."\n', encoding="utf-8")
    assert read_examples_file(csv).layout == "alpaca"


def test_a_single_row_is_alpaca(tmp_path):
    f = read_examples_file(_jsonl(tmp_path / "one.jsonl", _guide(EN_PREAMBLE, [("Where is Berlin's office?", "Mitte.")])))
    assert f.layout == "alpaca" and f.examples[0].question == EN_PREAMBLE  # one row shows no shared preamble


def test_one_instruction_without_input_is_alpaca_with_duplicate_questions(tmp_path, db):
    rows = [{"instruction": "What is the VPN?", "output": f"WireGuard, take {i}."} for i in range(3)]
    f = read_examples_file(_jsonl(tmp_path / "dupes.jsonl", rows))
    assert f.layout == "alpaca" and len(f.examples) == 3
    assert add_examples(db, f.examples) == (1, 2)  # dedup keeps the first


def test_rows_with_another_instruction_in_a_guide_file_are_read_alpaca_style_and_counted(tmp_path):
    rows = _guide(ZH_PREAMBLE, [("报销流程?", "费控系统。"), ("年假?", "15 天。"), ("VPN?", "WireGuard。")])
    rows.append({"instruction": "Who approves travel?", "input": "Berlin", "output": "Your team lead."})
    f = read_examples_file(_jsonl(tmp_path / "mixed.jsonl", rows))
    assert f.layout == "guide"
    assert (f.examples[-1].question, f.examples[-1].input) == ("Who approves travel?", "Berlin")
    assert f.description == (f'question = input; the instruction is the same on 3 of 4 rows: "{ZH_PREAMBLE}"; '
                             "1 row with another instruction read as question = instruction, context = input "
                             "(Alpaca layout)")


def test_a_preamble_row_with_empty_input_refuses_the_file_whole(tmp_path):
    rows = _guide(EN_PREAMBLE, [("How do I file expenses?", "Expenses tool."), ("", "Orphan answer."),
                                ("Leave days?", "28."), ("Badge lost?", "Tell security.")])
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ImportFileError) as err:
        read_examples_file(path)
    assert err.value.problems == [f'{path}:2: empty `input`: rows with the shared instruction "{EN_PREAMBLE}" '
                                  "ask their question there"]


def test_question_answer_messages_and_mixed_files_say_how_they_were_read(tmp_path):
    qa = read_examples_file(_jsonl(tmp_path / "qa.jsonl", [{"question": "Q?", "answer": "A."}]))
    assert (qa.layout, qa.description) == ("question/answer", "question = question, answer = answer")
    msg = {"messages": [{"role": "user", "content": "怎么连 VPN?"}, {"role": "assistant", "content": "用 WireGuard。"}]}
    chat = read_examples_file(_jsonl(tmp_path / "chat.jsonl", [msg]))
    assert chat.layout == "messages" and "user turn" in chat.description
    mixed = read_examples_file(_jsonl(tmp_path / "mixed.jsonl", [msg, {"question": "Q?", "answer": "A."},
                                                                 {"question": "Q2?", "answer": "A2."}]))
    assert mixed.layout == "mixed"
    assert mixed.description.startswith("1 row read as question = the user turn")
    assert "; 2 rows read as question = question, answer = answer" in mixed.description


def test_sharegpt_conversations_as_llama_factory_writes_them(tmp_path):
    rows = [{"conversations": [{"from": "system", "value": "你是诊所助手"}, {"from": "human", "value": "诊所周日开门吗？"},
                               {"from": "gpt", "value": "不开，周日和法定节假日休息。"}], "system": "你是诊所助手"},
            {"conversations": [{"role": "user", "content": "Who counts controlled substances?"},
                               {"role": "assistant", "content": "The nurses, at every shift change."}]}]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    f = read_examples_file(path)
    assert (f.layout, f.description) == ("sharegpt", "question = the human turn, answer = the gpt turn (ShareGPT "
                                         "conversations) (`system` of 1 row not used: the bot answers with kbloop's "
                                         "system prompt, and training uses the same)")
    assert f.examples == [NewExample("诊所周日开门吗？", "不开，周日和法定节假日休息。"),
                          NewExample("Who counts controlled substances?", "The nurses, at every shift change.")]


def test_chat_records_with_more_than_one_exchange_or_unknown_turns_are_named(tmp_path):
    two = [{"from": "human", "value": "Q1?"}, {"from": "gpt", "value": "A1."}, {"from": "human", "value": "Q2?"},
           {"from": "gpt", "value": "A2."}]
    path = _jsonl(tmp_path / "chat.jsonl", [
        {"conversations": two},
        {"conversations": [{"from": "human", "value": "Q?"}, {"from": "bot", "value": "A."}]},
        {"conversations": [{"value": "Q?"}, {"from": "gpt", "value": "A."}]},
        {"messages": [{"role": "user", "content": "Q?"}, {"role": ["assistant"], "content": "A."}]},
    ])
    with pytest.raises(ImportFileError) as err:
        read_examples_file(path)
    assert err.value.problems == [
        f"{path}:1: `conversations` must hold exactly one user turn and one assistant turn (kbloop trains single "
        "questions; this one has 2 and 2)",
        f"{path}:2: unknown role(s) in `conversations`: bot",
        f"{path}:3: a turn in `conversations` has no `from`",
        f"{path}:4: unknown role(s) in `messages`: ['assistant']",
    ]


def test_field_names_in_any_case_and_the_other_common_names_of_a_question_and_answer(tmp_path):
    sheet = tmp_path / "sheet.csv"  # a spreadsheet's header row
    sheet.write_text("Question,Answer\nWhen do we close?,At 19:00.\n", encoding="utf-8")
    assert read_examples_file(sheet).examples == [NewExample("When do we close?", "At 19:00.")]
    zh = tmp_path / "zh.csv"
    zh.write_text("问题,答案\n诊所几点关门？,19:00 关门。\n", encoding="utf-8")
    assert (read_examples_file(zh).description, read_examples_file(zh).examples) == (
        "question = 问题, answer = 答案", [NewExample("诊所几点关门？", "19:00 关门。")])
    trl = _jsonl(tmp_path / "trl.jsonl", [{"prompt": "When do we open?", "completion": "07:30."}])
    assert (read_examples_file(trl).layout, read_examples_file(trl).examples) == (
        "prompt/completion", [NewExample("When do we open?", "07:30.")])
    swift = _jsonl(tmp_path / "swift.jsonl", [{"query": "Who signs contracts?", "response": "Legal.", "history": []}])
    assert read_examples_file(swift).description == "question = query, answer = response"
    guide = tmp_path / "guide.csv"  # the guide's layout with capitalised headers is still the guide's layout
    guide.write_text("Instruction,Input,Output\n" + "".join(f'"{EN_PREAMBLE}",Q{i}?,A{i}.\n' for i in range(3)),
                     encoding="utf-8")
    assert [e.question for e in read_examples_file(guide).examples] == ["Q0?", "Q1?", "Q2?"]
    clash = tmp_path / "clash.csv"
    clash.write_text("Question,question,Answer\nA?,B?,C.\nD?,E?,F.\n", encoding="utf-8")
    with pytest.raises(ImportFileError) as err:
        read_examples_file(clash)
    assert err.value.problems == [f"{clash}:2: fields that differ only in case or spaces ('question' twice); keep one"]


def test_a_row_with_earlier_turns_in_history_is_refused_not_read_alone(tmp_path):
    """LLaMA-Factory's Alpaca layout keeps a follow-up's earlier turns in `history` (ms-swift's query/response too):
    "What about weekends?" read alone would train an answer to a question it does not ask."""
    path = _jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "When is the depot open?", "input": "", "output": "Weekdays 7 to 19.", "history": []},
        {"instruction": "What about weekends?", "input": "", "output": "Closed on Sundays.",
         "history": [["When is the depot open?", "Weekdays 7 to 19."]]},
        {"query": "周末呢？", "response": "周日休息。", "history": [["仓库几点开门？", "七点。"], ["几点关门？", "十九点。"]]},
    ])
    with pytest.raises(ImportFileError) as err:
        read_examples_file(path)
    assert [p.split(": `history` holds ")[0] for p in err.value.problems] == [f"{path}:2", f"{path}:3"]
    assert "1 earlier turn:" in err.value.problems[0] and "2 earlier turns:" in err.value.problems[1]
    # A row's own system prompt is not used, and the import says so.
    path = _jsonl(tmp_path / "system.jsonl", [
        {"system": "You are the depot assistant.", "instruction": "When is the depot open?", "output": "7 to 19."},
        {"system": "", "instruction": "Who runs nights?", "output": "Li Wei."}])
    assert read_examples_file(path).description == (
        "question = instruction, context = input (Alpaca layout) (`system` of 1 row not used: the bot answers with "
        "kbloop's system prompt, and training uses the same)")
    chat = _jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "system", "content": "You are the depot assistant."}, {"role": "user", "content": "Open on Sunday?"},
        {"role": "assistant", "content": "No."}]}, {"messages": [
        {"role": "user", "content": "Open on Monday?"}, {"role": "assistant", "content": "Yes."}]}])
    assert read_examples_file(chat).description.endswith("(`system` of 1 row not used: the bot answers with kbloop's "
                                                         "system prompt, and training uses the same)")


def test_chinese_windows_csv_in_gbk_and_excel_unicode_text_are_read_and_said(tmp_path):
    """Excel on Chinese Windows saves a CSV in GBK (code page 936); its "Unicode text" is UTF-16 with a BOM."""
    gbk = tmp_path / "gbk.csv"
    gbk.write_bytes("问题,答案\n仓库几点开门？,早上七点。\n“叉车证”多久复审？,每四年一次。\n".encode("gbk"))
    read = read_examples_file(gbk)
    assert read.examples == [NewExample("仓库几点开门？", "早上七点。"), NewExample("“叉车证”多久复审？", "每四年一次。")]
    assert read.description == "question = 问题, answer = 答案 (the file's text is GB18030, not UTF-8)"
    crlf = tmp_path / "crlf.csv"  # Excel's CSV: \r\n between rows and inside a quoted, multi-line cell
    crlf.write_bytes(b'question,answer\r\nWhere is lot B?,"Behind gate 2.\r\nAsk security for a pass."\r\n')
    assert read_examples_file(crlf).examples == [NewExample("Where is lot B?", "Behind gate 2.\nAsk security for a pass.")]
    utf16 = tmp_path / "unicode.tsv"
    utf16.write_bytes("question\tanswer\nWhere is lot B?\tBehind gate 2.\n".encode("utf-16"))
    assert read_examples_file(utf16).examples == [NewExample("Where is lot B?", "Behind gate 2.")]
    assert read_examples_file(utf16).description.endswith("(the file's text is UTF-16, not UTF-8)")
    # Latin-1 is refused, whether its bytes fail as GBK ("café open": é, then a space) or read as GBK characters
    # outside GB2312 ("Cafés", "für": é then s, ü then r).
    for line in ("Is the café open?,oui", "Cafés?,Zwei für alle"):
        latin = tmp_path / "latin.csv"
        latin.write_bytes(f"question,answer\n{line}\n".encode("latin-1"))
        with pytest.raises(StoreError, match=r"latin.csv:2: not UTF-8 text \(byte 0x..\), nor Chinese text in GB18030"):
            read_examples_file(latin)


def test_a_title_above_the_header_of_a_sheet_or_csv_is_skipped_and_said(tmp_path):
    """Spreadsheets kept by people often start with a title row, and a blank one, above the header."""
    import openpyxl

    book = openpyxl.Workbook()
    for row in (["员工常见问题汇总（2025版）"], [], ["序号", "问题", "答案"], [1, "仓库几点开门？", "早上七点。"],
                [2, "叉车证多久复审？", None]):
        book.active.append(row)
    sheet = tmp_path / "faq.xlsx"
    book.save(sheet)
    with pytest.raises(ImportFileError) as err:
        read_examples_file(sheet)
    assert err.value.problems == [f"{sheet}:5: missing or empty `答案`"]  # the sheet's own row numbers
    book.active.delete_rows(5)
    book.save(sheet)
    read = read_examples_file(sheet)
    assert read.examples == [NewExample("仓库几点开门？", "早上七点。")]
    assert read.description == "question = 问题, answer = 答案 (2 rows above the header skipped: a title)"
    csv_file = tmp_path / "faq.csv"
    csv_file.write_text("Staff FAQ,,\nquestion,answer,owner\nWhen do we open?,At 7.,Ops\n", encoding="utf-8")
    read = read_examples_file(csv_file)
    assert read.examples == [NewExample("When do we open?", "At 7.")] and read.lines == (3,)
    assert read.description.endswith("(1 row above the header skipped: a title)")
    plain = tmp_path / "plain.csv"  # a header on the first row is read as before, nothing said
    plain.write_text("question,answer\nWhen do we open?,At 7.\n", encoding="utf-8")
    assert read_examples_file(plain).description == "question = question, answer = answer"


def test_an_excel_sheet_is_read_as_a_csv_is_with_rows_as_lines(tmp_path):
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    for row in (["问题", "答案", "Owner"], ["诊所几点关门？", "19:00 关门。", "前台"], [None, None, None],
                ["How many scrub sets a year?", 3, "Facilities"], ["Who keeps the cabinet key?", None, "Nursing"]):
        sheet.append(row)
    book.create_sheet("Notes").append(["not read"])
    path = tmp_path / "qa.xlsx"
    book.save(path)
    with pytest.raises(ImportFileError) as err:
        read_examples_file(path)
    assert err.value.problems == [f"{path}:5: missing or empty `答案`"]  # the sheet's row 5; row 3 is empty
    sheet.delete_rows(5)
    book.save(path)
    f = read_examples_file(path)
    assert f.description == "question = 问题, answer = 答案"
    assert f.examples == [NewExample("诊所几点关门？", "19:00 关门。"), NewExample("How many scrub sets a year?", "3")]
    assert f.lines == (2, 4)
    broken = tmp_path / "broken.xlsx"
    broken.write_bytes(b"PK\x03\x04 not a workbook")
    with pytest.raises(ImportFileError, match=r"broken.xlsx: not a readable Excel workbook \("):
        read_examples_file(broken)


def test_named_fields_override_detection(tmp_path):
    custom = _jsonl(tmp_path / "custom.jsonl", [{"query": "Where is the Berlin office?", "response": "Mitte.", "n": 1}])
    f = read_examples_file(custom, question_field="query", answer_field="response")
    assert (f.layout, f.description) == ("fields", "question = query, answer = response")
    assert f.examples == [NewExample("Where is the Berlin office?", "Mitte.")]
    # Forcing the guide reading on a file detection takes for Alpaca (one row: no shared preamble to see).
    one = _jsonl(tmp_path / "one.jsonl", _guide(ZH_PREAMBLE, [("报销流程?", "费控系统。")]))
    forced = read_examples_file(one, question_field="input")  # the answer field defaults to `output`
    assert forced.examples == [NewExample("报销流程?", "费控系统。")]
    assert forced.description == "question = input, answer = output"
    # And the Alpaca reading on a guide file: `input` stays context when it is not the question.
    guide = _jsonl(tmp_path / "guide.jsonl", _guide(EN_PREAMBLE, [("Q1?", "A1."), ("Q2?", "A2.")]))
    alpaca = read_examples_file(guide, question_field="instruction", answer_field="output")
    assert [(e.question, e.input) for e in alpaca.examples] == [(EN_PREAMBLE, "Q1?"), (EN_PREAMBLE, "Q2?")]


def test_unknown_or_clashing_field_names_are_clear_errors(tmp_path):
    path = _jsonl(tmp_path / "custom.jsonl", [{"query": "Q?", "response": "A."}, {"query": "Q2?"}])
    with pytest.raises(StoreError, match=r"custom.jsonl: no field `answer` in the file \(fields: query, response\)"):
        read_examples_file(path, question_field="query", answer_field="answer")
    with pytest.raises(ImportFileError, match="cannot be both the question and the answer"):
        read_examples_file(path, question_field="query", answer_field="query")
    with pytest.raises(ImportFileError) as err:  # a row without the field is a bad line
        read_examples_file(path, question_field="query", answer_field="response")
    assert err.value.problems == [f"{path}:2: missing or empty `response`"]


def test_guide_import_stores_the_bare_question(tmp_path, db):
    f = read_examples_file(_jsonl(tmp_path / "zh.jsonl", _guide(ZH_PREAMBLE, [("报销流程?", "费控系统。"),
                                                                             ("年假?", "15 天。")])))
    add_examples(db, f.examples)
    assert sorted((e.question, e.input) for e in list_examples(db)) == [("年假?", ""), ("报销流程?", "")]


def test_limits_are_reported_per_line(tmp_path):
    from store.examples import MAX_ANSWER_CHARS, MAX_QUESTION_CHARS

    path = _jsonl(tmp_path / "long.jsonl", [{"question": "Q?", "answer": "A."},
                                             {"question": "q" * (MAX_QUESTION_CHARS + 1), "answer": "A."},
                                             {"question": "Q2?", "answer": "a" * (MAX_ANSWER_CHARS + 1)}])
    with pytest.raises(ImportFileError) as err:
        read_examples_file(path)
    assert err.value.problems == [
        f"{path}:2: the question is {MAX_QUESTION_CHARS + 1:,} characters long; the limit is {MAX_QUESTION_CHARS:,}",
        f"{path}:3: the answer is {MAX_ANSWER_CHARS + 1:,} characters long; the limit is {MAX_ANSWER_CHARS:,}",
    ]


def test_csv_header_must_name_each_column_once(tmp_path):
    path = tmp_path / "dup.csv"
    path.write_text("question, question,answer\nA?,B?,C.\n", encoding="utf-8")
    with pytest.raises(ImportFileError, match="column `question` appears 2 times"):
        read_examples_file(path)


def test_store_refuses_oversized_or_nul_text_whatever_the_path(db):
    from store.examples import MAX_ANSWER_CHARS

    with pytest.raises(StoreError, match="the answer is .* the limit is"):
        add_examples(db, [NewExample("Q?", "a" * (MAX_ANSWER_CHARS + 1))])
    with pytest.raises(StoreError, match="NUL character"):
        add_examples(db, [NewExample("Q\x00?", "A.")])
    assert list_examples(db) == []


def test_import_examples_lists_contact_details_without_refusing(db, tmp_path):
    from store.formats import import_examples

    path = _jsonl(tmp_path / "contact.jsonl", [{"question": "Payroll?", "answer": "Ask payroll@example.com."}])
    result = import_examples(db, path, reviewer="import")
    assert result.added == 1 and result.notices == (f"{path}:1: contact details e-mail address (payr…om)",)


def test_another_answer_to_a_question_already_there_is_said_not_skipped_as_a_duplicate(db, tmp_path):
    """A company re-imports its FAQ with an updated answer: the approved one stays (a curator decides which is right),
    but the row is named, with how to change it, instead of counting as one more duplicate."""
    from store.formats import import_examples

    first = _jsonl(tmp_path / "faq.jsonl", [{"question": "Where is lot B?", "answer": "Behind gate 2."},
                                            {"question": "Where is lot B?", "answer": "Next to the canteen."},
                                            {"question": "Where is lot A?", "answer": "By reception."}])
    result = import_examples(db, first, reviewer="import")
    assert (result.added, result.duplicates) == (2, 1)
    assert result.other_answers == (f"{first}:2: the same question as line 1 with another answer; the first was added",)
    [lot_b] = [e for e in list_examples(db) if e.question == "Where is lot B?"]
    updated = _jsonl(tmp_path / "faq-v2.jsonl", [{"question": "Where is lot B?", "answer": "Behind gate 3 since March."},
                                                 {"question": "Where is lot A?", "answer": "By reception."}])
    result = import_examples(db, updated, reviewer="import")
    assert (result.added, result.duplicates) == (0, 2)
    assert result.other_answers == (
        f"{updated}:1: example #{lot_b.id} (approved) already holds this question with another answer; kept "
        f"(`kbloop review approve {lot_b.id} --answer …` or the playground's Review tab changes it)",)
    assert result.summary("faq-v2.jsonl").startswith(
        "faq-v2.jsonl: 0 examples imported as approved, 1 duplicate skipped, 1 not added because its question already "
        "has another answer (below).")
    assert [e.answer for e in list_examples(db) if e.question == "Where is lot B?"] == ["Behind gate 2."]

"""Verified answers: approved examples matched by question, in English, in Chinese and across the two, in
effect for the very next lookup after an approval, an edit or a rejection. Real SQLite file, real embedder."""

from __future__ import annotations

import pytest

from finetune.serving.verified import find_verified, normalise_question, related_examples, search_examples
from store.examples import NewExample, add_examples, list_examples, review_example, update_example
from store.verified import example_embeddings

APPROVED = [
    NewExample("Who is the Data Protection Officer?", "Dr. Anja Weber, reachable at dpo@example.com."),
    NewExample("When was Northwind Lattice founded?", "Northwind Lattice was founded in 2011 in Berlin."),
    NewExample("Who needs to approve an expense claim of €3,200?", "Your manager and the finance lead."),
    NewExample("What is the daily meal allowance on a business trip to France?", "€53 a day for a full day."),
    NewExample("在国内出差坐高铁可以坐一等座吗？", "可以，单程超过 4 小时的高铁可以坐一等座。"),
    NewExample("SEV4 是什么级别的问题？", "SEV4 是不影响客户的小问题，在工作时间内处理。"),
    NewExample("上海的产假一共多少天？", "上海的产假一共 158 天。"),
    NewExample("When is salary paid in Berlin?", "On the last working day of the month."),
]
# Paraphrases and translations from bench/data/verified_paraphrases.jsonl that the bundled embedder matches
# (bench/verified_matching.py: about half of the same-language ones do, few translations).
MATCHING = [
    ("What year was Northwind Lattice started?", "When was Northwind Lattice founded?"),
    ("I have a 3200 euro expense claim - whose approval do I need?", "Who needs to approve an expense claim of €3,200?"),
    ("国内出差乘高铁，能买一等座吗？", "在国内出差坐高铁可以坐一等座吗？"),
    ("Northwind Lattice 是哪一年成立的？", "When was Northwind Lattice founded?"),
    ("What kind of issue is a SEV4?", "SEV4 是什么级别的问题？"),
]


@pytest.fixture
def approved(db):
    add_examples(db, APPROVED, status="approved", reviewer="import")
    return {e.question: e for e in list_examples(db)}


def test_the_same_question_written_differently_always_matches(db, approved):
    match = find_verified(db, "  who is the data protection officer ")
    assert match is not None and match.exact
    assert match.example.answer == APPROVED[0].answer
    assert normalise_question("ＷＨＯ is  it？") == "who is it"
    traditional = find_verified(db, "在國內出差坐高鐵可以坐一等座嗎？")  # the approved question in traditional characters
    assert traditional is not None and traditional.exact and traditional.example.question == "在国内出差坐高铁可以坐一等座吗？"


@pytest.mark.parametrize("question, expected", MATCHING)
def test_a_paraphrase_or_a_translation_matches_its_approved_example(db, approved, question, expected):
    match = find_verified(db, question)
    assert match is not None, search_examples(db, question, k=2)
    assert match.example.question == expected and not match.exact


@pytest.mark.parametrize("question", [
    "What's the weather going to be like tomorrow?",
    "帮我写一首关于秋天的诗。",
    "When is salary paid in Shanghai?",  # the same subject as an approved question, another answer
    "What is the daily meal allowance on a business trip to Italy?",
    "上海的年假一共多少天？",
])
def test_a_different_question_never_gets_an_approved_answer(db, approved, question):
    assert find_verified(db, question) is None, search_examples(db, question, k=1)


def test_approval_edit_and_rejection_count_for_the_next_question(db):
    (added, _) = add_examples(db, [NewExample("How do I get a desk on floor 6?", "Ask the office team in #office.")],
                              status="pending", source="feedback")
    assert added == 1
    question = "What's the process for getting a desk on the 6th floor?"
    assert find_verified(db, question) is None  # pending: not yet a verified answer
    example = list_examples(db)[0]
    review_example(db, example.id, decision="approved", reviewer="alice")
    match = find_verified(db, question)
    assert match is not None and match.example.reviewer == "alice"
    review_example(db, example.id, decision="approved", reviewer="bob", answer="Book one in Deskly.")
    assert find_verified(db, question).example.answer == "Book one in Deskly."
    review_example(db, example.id, decision="rejected", reviewer="bob")
    assert find_verified(db, question) is None


def test_each_question_is_embedded_once_and_again_after_an_edit(db, approved):
    from finetune.serving.embedding import embedding_model_name

    find_verified(db, "anything")
    stored = example_embeddings(db, embedding_model_name())
    assert set(stored) == {e.id for e in approved.values()}
    dpo = approved["Who is the Data Protection Officer?"]
    update_example(db, dpo.id, question="Who is our privacy officer?")
    assert find_verified(db, "Who is our privacy officer?").exact
    assert example_embeddings(db, embedding_model_name())[dpo.id][0] != stored[dpo.id][0]


def test_related_examples_leave_out_the_example_itself(db, approved):
    salary = approved["When is salary paid in Berlin?"]
    related = related_examples(db, salary.question, k=3)
    assert salary.id not in {m.example.id for m in related}  # an exact match is a verified answer, not context
    on_call = "What do Berlin employees get paid for being on call?"
    assert salary.id in {m.example.id for m in related_examples(db, on_call, k=3)}  # same subject: context
    assert salary.id not in {m.example.id for m in related_examples(db, on_call, k=3, exclude=frozenset({salary.id}))}


def test_an_empty_store_matches_nothing(db):
    assert find_verified(db, "Who is the Data Protection Officer?") is None
    assert search_examples(db, "Who is the Data Protection Officer?") == []

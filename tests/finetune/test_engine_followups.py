"""Follow-ups: a question asked in a Slack thread where kbloop already answered gets the thread's earlier turns
in its prompt, retrieval on the question made standalone; a correction made on such a follow-up trains on the
very prompt the engine served."""

from __future__ import annotations

import pytest

from finetune.model.prompting import (
    MAX_HISTORY_TOKENS,
    SYSTEM_PROMPT,
    Turn,
    build_messages,
    history_within,
    is_follow_up,
    render_prompt,
    standalone_question,
)
from finetune.serving.engine import Engine, EngineConfig, thread_history
from finetune.serving.retrieval import embed_missing_passages
from finetune.training.data import IGNORE_INDEX, as_trained_records, build_training_examples, encode_example
from store import open_db
from store.documents import import_documents
from store.examples import review_example, training_examples
from store.interactions import get_interaction, record_interaction, record_vote
from tests.conftest import SAMPLES

FIRST = Turn("How many days of annual leave do I get?", "You get 25 days a year.")


@pytest.mark.parametrize("question, follow_up", [
    ("and for contractors?", True),
    ("What about part-time staff?", True),
    ("Does it carry over to next year?", True),
    ("那合同工呢？", True),
    ("它可以结转到明年吗？", True),
    ("请问公司的差旅报销流程是怎样的？", False),
    ("How do I set up the VPN on my laptop?", False),
    ("What is the minimum password length for admin accounts?", False),
])
def test_follow_ups_are_told_from_new_questions(question, follow_up):
    assert is_follow_up(question) is follow_up


def test_a_follow_up_is_searched_with_the_question_it_follows():
    assert standalone_question("and for contractors?", [FIRST]) == (
        "How many days of annual leave do I get? and for contractors?")
    second = Turn("and for contractors?", "Contractors follow their contract.")
    assert standalone_question("and interns?", [FIRST, second]) == (
        "How many days of annual leave do I get? and for contractors? and interns?")
    assert standalone_question("How do I set up the VPN on my laptop?", [FIRST]) == (
        "How do I set up the VPN on my laptop?")
    assert standalone_question("and for contractors?", []) == "and for contractors?"  # no thread: as asked


def test_earlier_turns_come_before_the_question_and_its_passages():
    messages = build_messages("and for contractors?", history=[FIRST])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"] == SYSTEM_PROMPT
    assert messages[1]["content"] == f"Question: {FIRST.question}" and messages[2]["content"] == FIRST.answer
    assert messages[3]["content"] == "Question: and for contractors?"
    assert build_messages("q") == build_messages("q", history=[])  # one-turn prompts are unchanged


def test_history_is_bounded_in_tokens_keeping_the_most_recent_turns(tokenizer):
    turns = [Turn(f"Question number {i}?", "word " * 100) for i in range(12)]
    kept = history_within(turns, tokenizer)
    assert kept and kept == turns[-len(kept):] and len(kept) < len(turns)
    used = sum(len(tokenizer(t.question + "\n" + t.answer.strip(), add_special_tokens=False)["input_ids"])
               for t in kept)
    assert used <= MAX_HISTORY_TOKENS
    assert history_within(turns, tokenizer, budget=10) == []


@pytest.mark.slow
def test_a_correction_on_a_follow_up_trains_on_the_prompt_that_was_served(db_path, kbloop_home, tokenizer, eot):
    db = open_db(db_path)
    import_documents(db, [SAMPLES / "kb"])
    embed_missing_passages(db)
    engine = Engine(db_path=db_path, home=kbloop_home, base_model="tiny", config=EngineConfig(k=3))
    engine.tokenizer = tokenizer  # prompts need the tokenizer only, not the model

    first = record_interaction(db, question=FIRST.question, answer=FIRST.answer, source="slack",
                               channel_id="C1", thread_ts="1711111111.000100")
    record_interaction(db, question="How do I set up the VPN?", answer="elsewhere", source="slack",
                       channel_id="C1", thread_ts="1711111111.999999")  # another thread: not a turn here
    follow_up = "and for contractors?"
    assert thread_history(db, channel_id="C1", thread_ts="1711111111.000100") == [FIRST]
    served = engine.prompt_ids(follow_up, channel_id="C1", thread_ts="1711111111.000100")
    served_text = tokenizer.decode(served)
    assert FIRST.question in served_text and FIRST.answer in served_text  # the thread is in the prompt
    assert served != engine.prompt_ids(follow_up)  # asked outside the thread, it is another prompt

    # The follow-up was answered (recorded as the engine records it), then corrected with 👎 and approved.
    second = record_interaction(db, question=follow_up, answer="Contractors get 25 days too.", source="slack",
                                channel_id="C1", thread_ts="1711111111.000100")
    assert second > first
    record_vote(db, interaction_id=second, user_id="U1", vote=-1, correction="Contractors follow their contract.")
    [pending] = [ex for ex in _all_examples(db) if ex.interaction_id == second]
    review_example(db, pending.id, decision="approved", reviewer="curator")
    examples, _ = training_examples(db)
    [example] = build_training_examples(db, examples, k=3)
    assert example.history == [FIRST]
    encoded = encode_example(tokenizer, example, max_length=4096, eot_id=eot)
    trained_prompt = [t for t, label in zip(encoded["input_ids"], encoded["labels"]) if label == IGNORE_INDEX]
    assert trained_prompt == served  # train and serve see the same prompt
    assert get_interaction(db, second).thread_ts == "1711111111.000100"

    # `kbloop data export --as-trained`: the conversation, rendered by the chat template, is the served prompt.
    [record], left_out = as_trained_records(db, "messages", k=3)
    *prompt, answer = record["messages"]
    assert tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"] == served
    assert answer == {"role": "assistant", "content": "Contractors follow their contract."} and left_out == 0
    [alpaca], _ = as_trained_records(db, "sft", k=3)
    assert alpaca["history"] == [[f"Question: {FIRST.question}", FIRST.answer]]
    assert (alpaca["system"], alpaca["instruction"], alpaca["output"]) == (
        prompt[0]["content"], prompt[-1]["content"], answer["content"])


def _all_examples(db):
    from store.examples import list_examples

    return list_examples(db, status="pending")

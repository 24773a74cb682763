"""Streaming answers from the engine: each row of a batch streams to its own consumer, and the pieces put
together are exactly the answer the engine gives without streaming."""

from __future__ import annotations

import threading

import pytest

from finetune.serving.engine import Engine, EngineConfig
from finetune.serving.retrieval import embed_missing_passages
from finetune.serving.streaming import TextStream, clean_answer, settled_text
from store import open_db
from store.documents import import_documents
from tests.conftest import SAMPLES
from tests.finetune.test_engine import QUESTIONS

# --- the rules, without a model ----------------------------------------------------------------------

@pytest.mark.parametrize("partial, settled", [
    ("  Hello", "Hello"),
    ("Hello ", "Hello"),  # a trailing space is stripped at the end unless more text follows
    ("Hello wor", "Hello wor"),
    ("caf\ufffd", "caf"),  # an incomplete character waits for its last byte
    ("Done.<|im", "Done."),  # may still become a chat marker
    ("Done. <", "Done."),
    ("Done.<|im_end|> and more", "Done."),
    ("a < b", "a < b"),
    ("", ""),
])
def test_settled_text_holds_back_what_may_still_change(partial, settled):
    assert settled_text(partial) == settled


def _stream(decodes: list[str]) -> tuple[list[str], str]:
    """Feed a row whose decode after each token is decodes[n]; returns (pieces sent, final answer)."""
    pieces: list[str] = []
    stream = TextStream(lambda ids: decodes[len(ids) - 1], pieces.append)
    for n in range(1, len(decodes) + 1):
        stream.update(list(range(n)))
    final = clean_answer(decodes[-1])
    stream.finish(final)
    return pieces, final


@pytest.mark.parametrize("decodes", [
    [" The", " The VPN", " The VPN needs", " The VPN needs a", " The VPN needs a token."],
    ["年", "年假", "年假有\ufffd", "年假有十", "年假有十天"],  # a character split over two tokens
    ["Yes", "Yes <", "Yes <|im", "Yes <|im_end|>", "Yes <|im_end|>ignored"],
    ["a", "a  ", "a  \n", "a  \nb", "a  \nb  "],
    ["<|im_start|>", "<|im_start|>x"],
])
def test_pieces_put_together_are_the_final_answer(decodes):
    pieces, final = _stream(decodes)
    assert "".join(pieces) == final
    assert all(pieces)


def test_a_consumer_that_fails_gets_nothing_more_and_the_batch_goes_on():
    calls = []

    def consumer(piece):
        calls.append(piece)
        raise RuntimeError("slack is down")

    stream = TextStream(lambda ids: "abc"[:len(ids)], consumer)
    stream.update([1])
    stream.update([1, 2])
    stream.finish("abc")
    assert calls == ["a"]


# --- the real engine on the tiny base -----------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    home = tmp_path_factory.mktemp("stream-home")
    db = open_db(home / "kbloop.db")
    import_documents(db, [SAMPLES / "kb"])
    embed_missing_passages(db)
    eng = Engine(db_path=home / "kbloop.db", home=home, base_model="tiny",
                 config=EngineConfig(max_new_tokens=24)).start()
    assert eng.wait_ready(600), eng.error
    yield eng
    eng.close()


@pytest.mark.slow
def test_each_row_of_a_batch_streams_to_its_own_consumer_and_loses_nothing(engine):
    plain = [engine.answer(q, record=False).text for q in QUESTIONS]
    pieces: list[list[str]] = [[] for _ in QUESTIONS]
    answers = [None] * len(QUESTIONS)
    barrier = threading.Barrier(len(QUESTIONS))
    batches_before = engine.batches_run

    def ask(i: int) -> None:
        barrier.wait()
        answers[i] = engine.answer(QUESTIONS[i], record=False, on_text=pieces[i].append)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(QUESTIONS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert engine.batches_run - batches_before < len(QUESTIONS)  # they shared batches
    generated = [i for i, a in enumerate(answers) if a.notice in (None, "weak_match")]  # weak: generated all the same
    assert len(generated) >= len(QUESTIONS) // 2
    for i, answer in enumerate(answers):
        assert answer.text == plain[i]  # streaming changes nothing in the answer
        # 0 lost characters, none added; a refused question streams nothing (its answer comes whole).
        assert "".join(pieces[i]) == (answer.text if i in generated else "")
    # The text arrived in pieces as it was generated, not in one go at the end.
    assert any(len(p) > 1 for p in pieces)


@pytest.mark.slow
def test_a_refused_question_streams_nothing_and_answers_whole(engine):
    pieces: list[str] = []
    answer = engine.answer("zzqx vvbw kkyj?", record=False, on_text=pieces.append)
    assert answer.notice == "no_match" and pieces == []

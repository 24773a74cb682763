"""The answer engine on the tiny base: recording, sources, batching, hot-swap, edge cases.

One engine (one loaded model) is shared by the module, as in `kbloop serve`; each test sets the active
adapter it needs. Adapters are real PEFT LoRA folders on the tiny base, registered in the store.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from finetune.model.loading import resolve_base
from finetune.serving.engine import (
    EMPTY_TEXT,
    NO_MATCH_TEXT,
    NO_MATCH_TEXT_ZH,
    STARTING_TEXT,
    Answer,
    Engine,
    EngineConfig,
    Source,
)
from finetune.serving.retrieval import embed_missing_passages
from store import StoreError, open_db
from store.adapters import activate_adapter, register_adapter, rollback_adapter
from store.documents import import_documents
from store.interactions import get_interaction
from tests.conftest import SAMPLES

# Loads the tiny base and the embedding model: tens of seconds, so not in the fast suite.
pytestmark = pytest.mark.slow

QUESTIONS = [
    "How do I set up the VPN on my laptop?",
    "How many weeks of parental leave do I get?",
    "What is the minimum password length?",
    "When is the year-end deployment freeze?",
    "如何预订会议室？",
    "年假有多少天？",
    "How long do I have to submit an expense claim?",
    "Who do I call when production is down at night?",
]


def make_lora_adapter(base_path: str, out: Path, *, seed: int) -> Path:
    """A real LoRA adapter on the tiny base, nudged by a few optimizer steps so that it changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = tokenizer([f"adapter {seed}: the VPN gateway is vpn-{seed}.example"], return_tensors="pt")
    for _ in range(3):
        loss = model(**batch, labels=batch.input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    home = tmp_path_factory.mktemp("engine-home")
    db_path = home / "kbloop.db"
    db = open_db(db_path)
    import_documents(db, [SAMPLES / "kb"])
    embed_missing_passages(db)
    base = resolve_base("tiny", home=home, db=db)
    for version, seed in (("v1", 1), ("v2", 2), ("v3", 3)):
        path = make_lora_adapter(base, home / "adapters" / version, seed=seed)
        register_adapter(db, version=version, path=str(path), base_model="tiny", method="lora", params={"r": 8},
                         dataset_hash=None, dataset_size=0, metrics={})
    broken = home / "adapters" / "v4"
    broken.mkdir()
    register_adapter(db, version="v4", path=str(broken), base_model="tiny", method="lora", params={},
                     dataset_hash=None, dataset_size=0, metrics={})
    return {"home": home, "db_path": db_path, "db": db}


@pytest.fixture(scope="module")
def engine(workspace):
    config = EngineConfig(max_new_tokens=16, adapter_cache_size=2)
    eng = Engine(db_path=workspace["db_path"], home=workspace["home"], base_model="tiny", config=config).start()
    assert eng.wait_ready(600), eng.error
    yield eng
    eng.close()


def deactivate_all(db) -> None:
    # Roll back until no adapter is active: the engine then answers with the base model.
    while True:
        try:
            rollback_adapter(db)
        except StoreError:
            return


def test_answer_is_recorded_with_id_sources_and_adapter(engine, workspace):
    db = workspace["db"]
    deactivate_all(db)
    a = engine.answer("How do I set up the VPN on my laptop?", source="slack", user_id="U1", channel_id="C1",
                      thread_ts="1.2", event_id="Ev1")
    assert isinstance(a, Answer) and a.notice is None and a.text
    assert a.adapter_version is None
    assert Source(title="VPN and Laptop Setup", doc_path="vpn-laptop-setup.md") in a.sources
    assert len({s.doc_path for s in a.sources}) == len(a.sources)  # each document once
    row = get_interaction(db, a.interaction_id)
    assert (row.question, row.answer, row.source, row.user_id, row.channel_id, row.thread_ts, row.event_id) == (
        "How do I set up the VPN on my laptop?", a.text, "slack", "U1", "C1", "1.2", "Ev1")
    assert row.sources == [{"title": s.title, "doc_path": s.doc_path} for s in a.sources]
    assert row.adapter_version is None and row.latency_ms == a.latency_ms
    assert a.to_dict()["sources"][0]["doc_path"]


def test_answers_are_cleaned_of_special_tokens_and_reproducible(engine, workspace):
    deactivate_all(workspace["db"])
    first = engine.answer(QUESTIONS[1], record=False)
    assert first.interaction_id is None
    assert "<|im_end|>" not in first.text and "<|im_start|>" not in first.text and "<|endoftext|>" not in first.text
    assert engine.answer(QUESTIONS[1], record=False).text == first.text  # greedy


def test_concurrent_questions_are_batched_and_answered_as_one_by_one(engine, workspace):
    deactivate_all(workspace["db"])
    one_by_one = [engine.answer(q, record=False).text for q in QUESTIONS]
    batches_before = engine.batches_run
    results: list[Answer | None] = [None] * len(QUESTIONS)
    barrier = threading.Barrier(len(QUESTIONS))

    def ask(i: int) -> None:
        barrier.wait()
        results[i] = engine.answer(QUESTIONS[i], record=False)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(QUESTIONS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert [r.text for r in results] == one_by_one
    assert engine.batches_run - batches_before < len(QUESTIONS)  # some questions shared a batch


def test_hot_swap_follows_the_active_adapter_without_restart(engine, workspace):
    db = workspace["db"]
    q = "How do I set up the VPN on my laptop?"
    deactivate_all(db)
    base = engine.answer(q, record=False)
    activate_adapter(db, "v1")
    a1 = engine.answer(q)
    assert a1.adapter_version == "v1" and a1.notice is None
    assert get_interaction(db, a1.interaction_id).adapter_version == "v1"
    activate_adapter(db, "v2")
    a2 = engine.answer(q)
    assert a2.adapter_version == "v2"
    assert len({base.text, a1.text, a2.text}) == 3  # each adapter really changes the output
    frm, to = rollback_adapter(db)
    assert (frm.version, to.version) == ("v2", "v1")
    again = engine.answer(q, record=False)
    assert again.adapter_version == "v1" and again.text == a1.text
    # "base" answers with adapters disabled, even while one is active and loaded.
    b = engine.answer(q, adapter="base", record=False)
    assert b.adapter_version is None and b.text == base.text


def test_an_explicit_version_answers_beside_the_active_one(engine, workspace):
    db = workspace["db"]
    activate_adapter(db, "v1")
    q = "What is the minimum password length?"
    v2 = engine.answer(q, adapter="v2", source="playground", record=False)
    active = engine.answer(q, record=False)
    assert (v2.adapter_version, active.adapter_version) == ("v2", "v1")
    with pytest.raises(StoreError, match="no adapter 'v99'"):
        engine.answer(q, adapter="v99")


def test_each_adapter_is_asked_with_the_passages_it_was_trained_with(engine, workspace):
    """An adapter records its prompts' passage count (tiny's default is none); the engine builds that prompt,
    and still names the retrieved sources."""
    import torch

    from finetune.model.loading import load_model_for_inference
    from finetune.model.prompting import PromptPassage, build_messages, render_prompt
    from finetune.serving.retrieval import retrieve_passages

    db, home = workspace["db"], workspace["home"]
    path = home / "adapters" / "v1"
    for version, k in (("v1-k0", 0), ("v1-k1", 1)):
        register_adapter(db, version=version, path=str(path), base_model="tiny", method="lora",
                         params={"r": 8, "k_passages": k}, dataset_hash=None, dataset_size=0, metrics={})
    question = QUESTIONS[1]
    top = retrieve_passages(db, question, k=3)[0]
    model, tok = load_model_for_inference(resolve_base("tiny", home=home, db=db), adapter_path=path)

    def greedy(passages) -> str:
        ids = tok(render_prompt(tok, build_messages(question, passages=passages)), return_tensors="pt",
                  add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=engine.config.max_new_tokens, do_sample=False)
        return tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True).strip()

    without = engine.answer(question, adapter="v1-k0", record=False)
    assert without.text == greedy([])
    assert without.sources and without.sources[0].doc_path == top.doc_path
    with_one = engine.answer(question, adapter="v1-k1", record=False)
    assert with_one.text == greedy([PromptPassage(top.title, top.content)])


def test_adapter_cache_unloads_the_least_recently_used(engine, workspace):
    activate_adapter(workspace["db"], "v1")
    for version in ("v1", "v2", "v3"):
        assert engine.answer(QUESTIONS[2], adapter=version, record=False).adapter_version == version
    assert engine.loaded_adapters == ["v2", "v3"]  # cache of 2: v1 was unloaded
    assert engine.answer(QUESTIONS[2], record=False).adapter_version == "v1"  # and loads again when needed


def test_no_request_fails_while_the_active_adapter_changes_under_load(engine, workspace):
    db = workspace["db"]
    activate_adapter(db, "v1")
    answers: list[Answer] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def load(i: int) -> None:
        while not stop.is_set():
            try:
                answers.append(engine.answer(QUESTIONS[i % len(QUESTIONS)], record=False))
            except BaseException as exc:  # noqa: BLE001 - any failure fails the test
                errors.append(exc)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    activate_adapter(db, "v2")
    swapped = len(answers)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(a.adapter_version == "v2" for a in answers[swapped:]):
        time.sleep(0.05)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert answers and all(a.notice is None and a.text for a in answers)
    assert {a.adapter_version for a in answers} <= {"v1", "v2"}
    assert answers[-1].adapter_version == "v2"


def test_an_adapter_that_cannot_load_is_reported_and_the_base_answers(engine, workspace):
    db = workspace["db"]
    activate_adapter(db, "v4")  # an empty folder
    a = engine.answer(QUESTIONS[0])
    assert a.adapter_version is None
    assert "adapter v4 could not be loaded" in a.notice
    assert get_interaction(db, a.interaction_id).adapter_version is None


def test_an_adapter_of_another_base_that_cannot_load_names_the_bases(engine, workspace):
    db = workspace["db"]
    folder = workspace["home"] / "adapters" / "v5"
    folder.mkdir()
    register_adapter(db, version="v5", path=str(folder), base_model="Qwen/Qwen2.5-7B-Instruct", method="lora",
                     params={}, dataset_hash=None, dataset_size=0, metrics={})
    a = engine.answer(QUESTIONS[0], adapter="v5", record=False)
    assert a.adapter_version is None
    assert "adapter v5 could not be loaded (it was trained on 'Qwen/Qwen2.5-7B-Instruct', this engine runs " \
           "'tiny'" in a.notice


def test_empty_question_gets_a_clear_message_and_is_not_recorded(engine):
    for question in ("", "   \n"):
        a = engine.answer(question)
        assert (a.text, a.notice, a.interaction_id, a.sources) == (EMPTY_TEXT, "empty", None, [])


def test_a_question_the_kb_does_not_cover_says_so_without_sources(engine, workspace):
    en = engine.answer("What is the airspeed velocity of an unladen swallow?")
    assert (en.text, en.sources, en.notice) == (NO_MATCH_TEXT, [], "no_match")
    assert get_interaction(workspace["db"], en.interaction_id).sources == []
    zh = engine.answer("月亮离地球有多远？", record=False)
    assert (zh.text, zh.sources) == (NO_MATCH_TEXT_ZH, [])


def test_an_answer_from_passages_that_barely_cover_the_question_carries_the_weak_match_notice(engine, workspace):
    # Off-topic for the sample KB, yet its best passage (annual leave) clears the threshold, by less than the
    # tuned band (bench/out/retrieval_caution.json): answered and cited, with the notice.
    deactivate_all(workspace["db"])
    weak = engine.answer("When do my stock options vest?", record=False)
    assert weak.notice == "weak_match" and weak.sources and weak.text
    covered = engine.answer("How do I connect to the VPN?", record=False)
    assert covered.notice is None and covered.sources


def test_a_question_longer_than_the_context_is_trimmed_and_said(engine, workspace):
    deactivate_all(workspace["db"])
    long_question = "How do I set up the VPN on my laptop? " + "Please explain every step in detail. " * 600
    a = engine.answer(long_question, record=False)
    assert a.notice and a.notice.startswith("trimmed")
    assert a.text and a.sources


def test_while_loading_answers_at_once_with_starting_up(workspace):
    eng = Engine(db_path=workspace["db_path"], home=workspace["home"], base_model="tiny")
    started = time.monotonic()
    a = eng.answer("How do I set up the VPN?")  # not started: still "loading"
    assert time.monotonic() - started < 1.0
    assert (a.text, a.notice, a.interaction_id) == (STARTING_TEXT, "starting", None)
    assert not eng.ready
    eng.close()


def test_a_base_model_that_does_not_exist_is_reported(workspace, tmp_path, caplog):
    eng = Engine(db_path=workspace["db_path"], home=workspace["home"], base_model=str(tmp_path / "nope")).start()
    assert not eng.wait_ready(60)
    assert "not found" in eng.error
    logged = [r for r in caplog.records if r.name == "finetune.serving.engine" and "not found" in r.getMessage()]
    assert logged and logged[0].exc_info is None  # the message says it all: no traceback on the terminal
    a = eng.answer("How do I set up the VPN?")
    assert a.notice == "unavailable" and "not found" in a.text
    eng.close()

"""End to end with the real answer engine on the tiny base: a signed mention in, a real generated answer
out through the fake Slack, the interaction recorded, and a 👎 correction landing in the review queue."""

from __future__ import annotations

import json

import pytest

from finetune.serving.engine import Engine, EngineConfig
from store import open_db
from store.documents import import_documents
from store.examples import list_examples
from store.interactions import get_interaction, list_interactions
from tests.bot.conftest import SECRET
from tests.conftest import small_sample_kb
from tests.fakes.slack_api import (
    BOT_USER_ID,
    app_mention_event,
    block_actions_payload,
    event_body,
    interactive_body,
    post_signed,
    view_submission_payload,
)


@pytest.fixture
def engine(db_path, kbloop_home, tmp_path):
    db = open_db(db_path)
    # A few sample documents, expenses among them: the first question embeds them, in seconds (the whole sample
    # KB takes minutes on a busy 2-core machine, past the wait for the answer).
    import_documents(db, [small_sample_kb(tmp_path / "kb")])
    eng = Engine(db_path=db_path, home=kbloop_home, base_model="tiny",
                 config=EngineConfig(max_new_tokens=24, time_limit_s=30)).start()
    assert eng.wait_ready(300), eng.error
    yield eng
    eng.close()


@pytest.mark.slow
def test_mention_answered_by_the_real_engine_then_corrected(start_bot, fake_slack, engine):
    bot = start_bot(engine=engine)
    body = event_body(app_mention_event(text=f"<@{BOT_USER_ID}> How do I submit an expense report?",
                                        ts="1711111111.000900"), event_id="EvReal")
    assert post_signed(bot.events_url, body, SECRET)[0] == 200
    assert post_signed(bot.events_url, body, SECRET, retry_num=1)[0] == 200  # Slack's retry
    update = fake_slack.wait_for("chat.update", 1, timeout=120)[0].params
    [interaction] = list_interactions(bot.db)
    assert interaction.event_id == "EvReal" and interaction.source == "slack"
    assert interaction.message_ts == update["ts"] and interaction.thread_ts == "1711111111.000900"
    assert interaction.sources, "retrieval found KB passages"
    rendered = json.dumps(update["blocks"])
    assert any(s["title"] in rendered for s in interaction.sources)
    values = [el["value"] for b in update["blocks"] if b["type"] == "actions" for el in b["elements"]]
    assert values == [str(interaction.id)] * 2
    assert len(fake_slack.requests("chat.postMessage")) == 1  # the retry did not answer again

    press = block_actions_payload(action_id="feedback_down", value=values[1], user="U555",
                                  response_url=fake_slack.response_url("vote"))
    assert post_signed(bot.events_url, interactive_body(press), SECRET)[0] == 200
    view = fake_slack.wait_for("views.open", 1)[0].params["view"]
    submit = view_submission_payload(callback_id="feedback_correction", private_metadata=view["private_metadata"],
                                     user="U555", values={"correction": {"correction_text": {
                                         "type": "plain_text_input", "value": "Use the expenses tool within 30 days."}}})
    assert post_signed(bot.events_url, interactive_body(submit), SECRET)[0] == 200
    fake_slack.wait_for("response_url:vote", 1)
    [pending] = list_examples(bot.db, status="pending")
    assert pending.answer == "Use the expenses tool within 30 days."
    assert pending.rejected_answer == get_interaction(bot.db, interaction.id).answer


@pytest.mark.slow
def test_a_mention_streams_the_real_engine_answer_without_losing_a_character(engine, start_bot, fake_slack):
    from bot.blocks import escape_markdown

    fake_slack.streaming = True
    bot = start_bot(engine=engine)
    body = event_body(app_mention_event(text=f"<@{BOT_USER_ID}> How do I submit an expense report?",
                                        ts="1711111111.000950"), event_id="EvStream")
    assert post_signed(bot.events_url, body, SECRET)[0] == 200
    stop = fake_slack.wait_for("chat.stopStream", 1, timeout=540)[0].params  # the first question embeds the KB
    [interaction] = list_interactions(bot.db)
    [message] = fake_slack.messages("C123")
    assert message["text"] == escape_markdown(interaction.answer)  # the engine's answer, all of it
    values = [el["value"] for b in stop["blocks"] if b["type"] == "actions" for el in b["elements"]]
    assert values == [str(interaction.id)] * 2
    assert fake_slack.requests("chat.update") == []  # no repair was needed

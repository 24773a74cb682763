"""The assistant surface (slack-bolt's Assistant middleware) over real HTTP: signed events shaped like
Slack's docs in, assistant.threads.* and chat.*Stream calls to the fake Slack out."""

from __future__ import annotations

from bot import messages
from bot.assistant import suggested_prompts
from bot.runtime import BotRuntime
from store import open_db
from store.assistant_threads import assistant_thread_context
from store.interactions import list_interactions, record_interaction, record_vote
from tests.bot.conftest import SECRET, bot_config
from tests.fakes.engine import ScriptedEngine
from tests.fakes.slack_api import assistant_message_event, assistant_thread_event, event_body, post_signed

THREAD = "1729999327.187299"


def _post(bot, event, event_id):
    assert post_signed(bot.events_url, event_body(event, event_id=event_id), SECRET)[0] == 200


def _ask(db, question, *, up=0, down=0, when=None):
    iid = record_interaction(db, question=question, answer="…", source="slack")
    if when:
        db.execute("UPDATE interactions SET created_at = ? WHERE id = ?", [when, iid])
        db.conn.commit()
    for n in range(up):
        record_vote(db, interaction_id=iid, user_id=f"UP{n}", vote=1)
    for n in range(down):
        record_vote(db, interaction_id=iid, user_id=f"DOWN{n}", vote=-1)
    return iid


def test_suggested_prompts_are_the_most_asked_and_most_liked_of_recent_weeks(db_path, fake_slack):
    db = open_db(db_path)
    rt = BotRuntime(config=bot_config(fake_slack), engine=None, db_path=db_path)
    assert [p["message"] for p in suggested_prompts(rt)] == list(messages.DEFAULT_PROMPTS)  # nothing asked yet
    for _ in range(3):
        _ask(db, "How do I set up the VPN?")
    _ask(db, "how do I set up the VPN? ")  # the same question
    _ask(db, "Where is the expense policy?", up=3)
    _ask(db, "What is the wifi password?", up=1)
    _ask(db, "Is the cafeteria open?", up=0)
    _ask(db, "Is the cafeteria open?", up=0)
    _ask(db, "Why is the build red?", up=1, down=2)  # a disliked answer is not suggested
    _ask(db, "Old question?", when="2020-01-01T00:00:00+00:00")  # not recent
    prompts = suggested_prompts(rt)
    assert [p["message"] for p in prompts] == [
        "how do I set up the VPN?", "Where is the expense policy?", "Is the cafeteria open?",
        "What is the wifi password?"]
    assert all(set(p) == {"title", "message"} and len(p["title"]) <= messages.PROMPT_TITLE_CHARS for p in prompts)
    rt.shutdown()


def test_a_started_thread_gets_a_title_and_suggested_prompts_and_keeps_its_context(start_bot, fake_slack):
    bot = start_bot()
    _ask(bot.db, "Where is the expense policy?", up=2)
    _post(bot, assistant_thread_event(thread_ts=THREAD, context_channel="C777"), "EvStart")
    prompts = fake_slack.wait_for("assistant.threads.setSuggestedPrompts", 1)[0].params
    title = fake_slack.wait_for("assistant.threads.setTitle", 1)[0].params
    assert prompts["channel_id"] == "D123" and prompts["thread_ts"] == THREAD
    assert prompts["prompts"][0] == {"title": "Where is the expense policy?", "message": "Where is the expense policy?"}
    assert title == {**title, "channel_id": "D123", "thread_ts": THREAD, "title": messages.ASSISTANT_TITLE}
    assert assistant_thread_context(bot.db, channel_id="D123", thread_ts=THREAD)["channel_id"] == "C777"

    _post(bot, assistant_thread_event(type="assistant_thread_context_changed", thread_ts=THREAD,
                                      context_channel="C888"), "EvContext")
    for _ in range(200):  # the listener runs after the ack
        if assistant_thread_context(bot.db, channel_id="D123", thread_ts=THREAD)["channel_id"] == "C888":
            break
        import time
        time.sleep(0.02)
    assert assistant_thread_context(bot.db, channel_id="D123", thread_ts=THREAD)["channel_id"] == "C888"
    assert fake_slack.requests("chat.update") == [] and fake_slack.requests("conversations.replies") == []


def test_a_question_in_an_assistant_thread_sets_a_status_first_then_streams_its_answer(start_bot, fake_slack):
    fake_slack.streaming = True
    bot = start_bot(engine=ScriptedEngine(None, after_first_piece=lambda: fake_slack.wait_for("chat.startStream", 1)))
    bot.engine.db_path = bot.db_path
    _post(bot, assistant_message_event(text="How do I set up the VPN?", thread_ts=THREAD, ts="1729999400.000100"),
          "EvAsk")
    stop = fake_slack.wait_for("chat.stopStream", 1)[0].params
    calls = [r.method for r in fake_slack.requests()]
    status = fake_slack.requests("assistant.threads.setStatus")[0].params
    assert calls.index("assistant.threads.setStatus") < calls.index("chat.startStream")  # the status came first
    assert status["thread_ts"] == THREAD and status["status"] == messages.STATUS_WORKING
    assert status["loading_messages"] == list(messages.LOADING_MESSAGES)
    title = fake_slack.requests("assistant.threads.setTitle")[0].params
    assert title["title"] == "How do I set up the VPN?"  # named by its first question
    start = fake_slack.requests("chat.startStream")[0].params
    assert start["channel"] == "D123" and start["thread_ts"] == THREAD
    [interaction] = list_interactions(bot.db)
    assert interaction.thread_ts == THREAD and interaction.question == "How do I set up the VPN?"
    assert [el["action_id"] for b in stop["blocks"] if b["type"] == "actions" for el in b["elements"]] == [
        "feedback_up", "feedback_down"]
    # A retried delivery of the same message (Slack's retry: X-Slack-Retry-Num) is not answered twice.
    body = event_body(assistant_message_event(text="How do I set up the VPN?", thread_ts=THREAD,
                                              ts="1729999400.000100"), event_id="EvAsk")
    assert post_signed(bot.events_url, body, SECRET, retry_num=1)[0] == 200
    import time
    time.sleep(0.3)
    assert len(bot.engine.calls) == 1


def test_agent_view_dm_open_gets_suggested_prompts(start_bot, fake_slack):
    bot = start_bot()
    event = {"type": "app_home_opened", "user": "U123", "channel": "D123", "tab": "messages", "event_ts": "1.2"}
    _post(bot, event, "EvHome")
    prompts = fake_slack.wait_for("assistant.threads.setSuggestedPrompts", 1)[0].params
    assert prompts["channel_id"] == "D123" and "thread_ts" not in prompts

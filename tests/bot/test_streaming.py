"""Streamed answers: chat.startStream → chat.appendStream → chat.stopStream, paced, escaped, ending with the
sources and the feedback buttons; the placeholder + chat.update fallback where Slack refuses streaming.

Pacing is checked on AnswerStream with a clock the test moves (no timed assertions); the bot over HTTP
is checked against the fake Slack, which plays a workspace with streaming (`fake_slack.streaming = True`)
or without it (the default).
"""

from __future__ import annotations

import json

from slack_sdk import WebClient

from bot.blocks import answer_tail, escape_markdown, settled_markdown_length
from bot.streaming import AnswerStream
from store.interactions import get_interaction, list_interactions, votes_for
from tests.bot.conftest import SECRET
from tests.fakes.engine import ScriptedEngine
from tests.fakes.slack_api import (
    BOT_USER_ID,
    TEAM_ID,
    app_mention_event,
    block_actions_payload,
    event_body,
    interactive_body,
    post_signed,
    slash_command_body,
)

MENTION = f"<@{BOT_USER_ID}> how do I get VPN access?"


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _stream(slack, clock, channel="C123") -> AnswerStream:
    client = WebClient(token="xoxb-test", base_url=slack.url)
    return AnswerStream(client, channel=channel, thread_ts="1711111111.000100", recipient_user_id="U1",
                        recipient_team_id=TEAM_ID, clock=clock, sleep=clock.sleep)


def _eventually(read, tries=200):
    """Poll `read` until it gives something (the bot records the message's ts around chat.stopStream)."""
    import time

    for _ in range(tries):
        value = read()
        if value:
            return value
        time.sleep(0.02)
    return read()


def _tail(iid=7):
    return answer_tail(source_titles=["VPN guide"], interaction_id=iid)


def _action_ids(blocks):
    return [el["action_id"] for b in blocks if b["type"] == "actions" for el in b["elements"]]


# --- pacing and text, with a clock the test moves ------------------------------------------------------

def test_updates_are_paced_and_the_final_message_is_the_whole_answer_with_buttons(fake_slack):
    fake_slack.streaming = True
    clock = Clock()
    stream = _stream(fake_slack, clock)
    stream.feed("The VPN ")
    assert stream.pump()  # the first text goes at once: chat.startStream
    stream.feed("needs a ")
    clock.now += 0.2
    assert not stream.pump()  # too soon after the last update
    stream.feed("token ")
    clock.now += 0.3
    assert stream.pump()  # 0.5 s later: one chat.appendStream with all that waited
    stream.feed("from IT.")
    ts = stream.finish("The VPN needs a token from IT.", tail_blocks=_tail(), full_blocks=[], fallback_text="x")
    calls = [r.method for r in fake_slack.requests() if r.method.startswith("chat.")]
    assert calls == ["chat.startStream", "chat.appendStream", "chat.stopStream"]
    assert all(b - a >= 0.5 for a, b in zip(stream.updates, stream.updates[1:]))  # the moved clock's times
    [message] = fake_slack.messages("C123")
    assert message["ts"] == ts and message["text"] == "The VPN needs a token from IT."
    assert message["thread_ts"] == "1711111111.000100" and not message["streaming"]
    assert _action_ids(message["blocks"]) == ["feedback_up", "feedback_down"]
    start = fake_slack.requests("chat.startStream")[0].params
    assert (start["recipient_user_id"], start["recipient_team_id"]) == ("U1", TEAM_ID)  # required in channels


def test_model_output_cannot_ping_or_forge_links_even_when_split_across_updates():
    pieces = ["See [the ", "guide]", "(http://evil.example) ", "@chan", "nel and <!he", "re> & @", "here."]
    text = "".join(pieces)
    sent = ""
    for i in range(1, len(pieces) + 1):
        partial = "".join(pieces[:i])
        escaped = escape_markdown(partial[:settled_markdown_length(partial)])
        assert escaped.startswith(sent)  # pieces only ever extend each other
        sent = escaped
    final = escape_markdown(text)
    assert final.startswith(sent)
    assert "](" not in final and "<" not in final and "@channel" not in final and "@here" not in final
    assert "&lt;!he" in final


def test_text_that_differs_from_the_final_answer_is_repaired(fake_slack):
    fake_slack.streaming = True
    clock = Clock()
    stream = _stream(fake_slack, clock)
    stream.feed("partial answer")
    assert stream.pump()
    full_blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": "Sorry, answering took too long."}}]
    ts = stream.finish("Sorry, answering took too long.", tail_blocks=_tail(), full_blocks=full_blocks + _tail(),
                       fallback_text="Sorry, answering took too long.")
    assert [r.method for r in fake_slack.requests() if r.method.startswith("chat.")] == [
        "chat.startStream", "chat.stopStream", "chat.update"]
    [message] = fake_slack.messages("C123")
    assert message["ts"] == ts and message["blocks"][0]["text"]["text"] == "Sorry, answering took too long."


def test_a_refused_stream_falls_back_to_placeholder_and_update(fake_slack):
    clock = Clock()
    stream = _stream(fake_slack, clock)  # the fake's default workspace has no streaming
    stream.feed("The VPN")
    assert stream.pump() is True or stream.refused
    assert stream.refused == "unknown_method"
    placeholder = fake_slack.requests("chat.postMessage")[0].params
    assert "Looking that up" in placeholder["text"] and placeholder["thread_ts"] == "1711111111.000100"
    full, _ = [{"type": "section", "text": {"type": "mrkdwn", "text": "The VPN needs a token."}}] + _tail(), None
    ts = stream.finish("The VPN needs a token.", tail_blocks=_tail(), full_blocks=full, fallback_text="The VPN")
    update = fake_slack.requests("chat.update")[0].params
    assert update["ts"] == ts and _action_ids(update["blocks"]) == ["feedback_up", "feedback_down"]
    assert len(fake_slack.requests("chat.startStream")) == 1


# --- the bot over HTTP ---------------------------------------------------------------------------------

def _mention(bot, event_id="Ev1", ts="1711111111.000100", text=MENTION, **kw):
    body = event_body(app_mention_event(text=text, ts=ts, **kw), event_id=event_id)
    assert post_signed(bot.events_url, body, SECRET)[0] == 200


def test_a_mention_is_answered_by_a_stream_ending_with_sources_and_buttons_and_feedback_works(start_bot, fake_slack):
    fake_slack.streaming = True
    bot = start_bot(engine=ScriptedEngine(None, reply=lambda q: "Ask IT for a <!channel> token, see [x](http://e).",
                                          after_first_piece=lambda: fake_slack.wait_for("chat.startStream", 1)))
    bot.engine.db_path = bot.db_path
    _mention(bot)
    stop = fake_slack.wait_for("chat.stopStream", 1)[0].params
    start = fake_slack.requests("chat.startStream")[0].params
    assert start["thread_ts"] == "1711111111.000100" and start["recipient_user_id"] == "U123"
    assert start["recipient_team_id"] == TEAM_ID
    [interaction] = list_interactions(bot.db)
    [message] = fake_slack.messages("C123")
    assert message["text"] == escape_markdown(interaction.answer)  # every character, escaped
    assert "<!channel>" not in message["text"] and "](" not in message["text"]
    values = {el["value"] for b in stop["blocks"] if b["type"] == "actions" for el in b["elements"]}
    assert _action_ids(stop["blocks"]) == ["feedback_up", "feedback_down"] and values == {str(interaction.id)}
    assert "VPN guide" in json.dumps(stop["blocks"])
    assert interaction.thread_ts == "1711111111.000100"
    assert _eventually(lambda: get_interaction(bot.db, interaction.id).message_ts) == message["ts"]
    assert fake_slack.requests("chat.postMessage") == [] and fake_slack.requests("chat.update") == []

    press = block_actions_payload(action_id="feedback_up", value=str(interaction.id), user="U9",
                                  message_ts=message["ts"], response_url=fake_slack.response_url("vote"))
    assert post_signed(bot.events_url, interactive_body(press), SECRET)[0] == 200
    fake_slack.wait_for("response_url:vote", 1)
    assert [v.vote for v in votes_for(bot.db, interaction.id)] == [1]
    down = block_actions_payload(action_id="feedback_down", value=str(interaction.id), user="U9",
                                 message_ts=message["ts"], response_url=fake_slack.response_url("vote"))
    assert post_signed(bot.events_url, interactive_body(down), SECRET)[0] == 200
    fake_slack.wait_for("views.open", 1)
    # The modal opens first (its trigger_id lives 3 s), the 👎 is recorded right after: one vote per user, the
    # latest wins.
    assert _eventually(lambda: [v.vote for v in votes_for(bot.db, interaction.id)] == [-1])


def test_where_streaming_is_refused_answers_use_placeholder_and_update_and_stop_trying(start_bot, fake_slack):
    # The fake's default workspace: chat.startStream is unknown there. The engine stand-in goes on generating
    # once the bot has tried to start the stream (as a real generation would still be running).
    bot = start_bot(engine=ScriptedEngine(None, after_first_piece=lambda: fake_slack.wait_for("chat.startStream", 1)))
    bot.engine.db_path = bot.db_path
    _mention(bot, event_id="Ev1", ts="1711111111.000100")
    update = fake_slack.wait_for("chat.update", 1)[0].params
    assert _action_ids(update["blocks"]) == ["feedback_up", "feedback_down"]
    assert len(fake_slack.requests("chat.startStream")) == 1
    # The bot remembers the refusal right after that final update: on a loaded machine the next mention could
    # otherwise arrive before it has (seen under xdist at load 7 on two cores).
    assert _eventually(lambda: bot.app.kbloop.streaming.error)
    _mention(bot, event_id="Ev2", ts="1711111111.000200")
    fake_slack.wait_for("chat.update", 2)
    assert len(fake_slack.requests("chat.startStream")) == 1  # refused once: not asked again for every question
    assert len(fake_slack.requests("chat.postMessage")) == 2
    assert [i.message_ts for i in list_interactions(bot.db)] == [m["ts"] for m in fake_slack.messages("C123")][::-1]


def test_slash_kb_answers_stay_ephemeral_and_are_not_streamed(start_bot, fake_slack):
    fake_slack.streaming = True
    bot = start_bot()
    body = slash_command_body(command="/kb", text="how do I reset my password?", response_url=fake_slack.response_url("kb"))
    assert post_signed(bot.events_url, body, SECRET)[0] == 200
    reply = fake_slack.wait_for("response_url:kb", 1)[0].params
    assert reply["response_type"] == "ephemeral"
    assert _action_ids(reply["blocks"]) == ["feedback_up", "feedback_down"]
    assert fake_slack.requests("chat.startStream") == []


def test_an_answer_too_long_for_one_call_ends_with_the_whole_answer_by_update(fake_slack):
    fake_slack.streaming = True
    clock = Clock()
    stream = _stream(fake_slack, clock)
    stream.feed("word ")
    assert stream.pump()
    long_answer = "word " * 3000  # 15,000 characters: over chat.stopStream's 12,000 per call
    full_blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": "word word"}}] + _tail()
    ts = stream.finish(long_answer, tail_blocks=_tail(), full_blocks=full_blocks, fallback_text="word")
    assert [r.method for r in fake_slack.requests() if r.method.startswith("chat.")] == [
        "chat.startStream", "chat.stopStream", "chat.update"]
    [message] = fake_slack.messages("C123")
    assert message["ts"] == ts and _action_ids(message["blocks"]) == ["feedback_up", "feedback_down"]


def test_an_answer_that_arrives_whole_is_posted_as_one_message(fake_slack):
    fake_slack.streaming = True
    stream = _stream(fake_slack, Clock())  # nothing fed: a verified answer, a refused question
    assert stream.whole_as_one_message  # the bot says so once a stream worked in the workspace
    full_blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": "Approved answer."}}] + _tail()
    ts = stream.finish("Approved answer.", tail_blocks=_tail(), full_blocks=full_blocks, fallback_text="Approved")
    assert [r.method for r in fake_slack.requests() if r.method.startswith("chat.")] == ["chat.postMessage"]
    assert fake_slack.requests("chat.postMessage")[0].params["thread_ts"] == "1711111111.000100"
    assert fake_slack.messages("C123")[0]["ts"] == ts


def test_while_streaming_is_not_known_to_work_a_whole_answer_uses_placeholder_and_update(fake_slack):
    client = WebClient(token="xoxb-test", base_url=fake_slack.url)
    clock = Clock()
    stream = AnswerStream(client, channel="C123", thread_ts="1711111111.000100", whole_as_one_message=False,
                          clock=clock, sleep=clock.sleep)
    full_blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": "Approved answer."}}] + _tail()
    ts = stream.finish("Approved answer.", tail_blocks=_tail(), full_blocks=full_blocks, fallback_text="Approved")
    assert [r.method for r in fake_slack.requests() if r.method.startswith("chat.")] == [
        "chat.postMessage", "chat.update"]
    assert fake_slack.requests("chat.update")[0].params["ts"] == ts

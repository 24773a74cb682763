"""Slack listeners for questions: mentions, DMs and /kb. Feedback (the buttons, the correction modal) is
bot.feedback, admin commands bot.commands, what the listeners share bot.runtime.

Every listener acknowledges first and then works: Slack wants a 200 within 3 seconds, and bolt runs
listeners in a thread pool (`process_before_response=False`), so the HTTP response leaves as soon as
`ack()` is called (in HTTP mode, events are even acked before bolt sees them, once stored in the event
inbox: bot.server). Generating an answer takes longer, so listeners only filter, dedupe and hand the
question to `BotRuntime.answers`, a separate pool that waits on the engine; the listener threads stay
free and acks stay fast under load.

Duplicates: Slack retries an event it thinks was not delivered (`X-Slack-Retry-Num`, same `event_id`),
and one mention of the bot can arrive both as `app_mention` and as `message`. Each delivery claims its
event id and the (channel, ts) of the message in the store (`claim_slack_events`, persisted, so also
across restarts); only the first claim answers. The cost of claiming before answering is at-most-once:
a crash between the claim and the answer leaves that question unanswered rather than answered twice.

Teams (store.teams): a question asked in a team's channel is the team's; in an assistant thread (a DM), the channel
the user is looking at (the thread's context, kept in the store by bot.assistant) decides. The engine then answers
from the shared and that team's rows only (`question_team`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from slack_bolt import App

import bot.blocks as blocks
import bot.messages as messages
from bot.runtime import BotRuntime
from bot.streaming import AnswerStream
from store.assistant_threads import assistant_thread_context
from store.interactions import set_interaction_message
from store.slack_events import claim_slack_events
from store.teams import team_for_channel

log = logging.getLogger("kbloop.bot")

# Engine notices that mean "no real answer was generated": no buttons, a note instead of sources.
NOT_ANSWERED = ("starting", "unavailable", "closed", "empty")


def ignored_event(event: dict, *, bot_user_id: str | None) -> str | None:
    """Why an event is not a question for us (None: it is). Own messages, other bots, edits, deletions,
    joins and every other message subtype are ignored."""
    if event.get("subtype"):
        return f"subtype {event['subtype']}"
    if event.get("bot_id") or event.get("bot_profile"):
        return "from a bot"
    user = event.get("user")
    if not user:
        return "no user"
    if bot_user_id and user == bot_user_id:
        return "our own message"
    if event.get("edited") or event.get("hidden"):
        return "an edit"
    return None


def question_text(text: str, *, bot_user_id: str | None) -> str:
    """The question as the user typed it: our mention removed, links, channels and mentions as plain text, Slack's
    &amp;/&lt;/&gt; turned back (blocks.plain_slack_text)."""
    if bot_user_id:
        text = re.sub(rf"<@{re.escape(bot_user_id)}(\|[^>]*)?>", " ", text or "")
    return re.sub(r"\s+", " ", blocks.plain_slack_text(text or "")).strip()


def _render_args(answer) -> dict:
    starting = (answer.notice or "") in NOT_ANSWERED
    who = f"adapter {answer.adapter_version}" if answer.adapter_version else "base model"
    footer = None if starting else f"{who} · {answer.latency_ms / 1000:.1f} s"
    return dict(source_titles=[s.title for s in answer.sources],
                interaction_id=None if starting else answer.interaction_id, footer=footer, starting=starting,
                verified_line=answer.verified_line, weak_match="weak_match" in (answer.notice or "").split("; "))


def render_answer(answer) -> tuple[list[dict], str]:
    return blocks.answer_message(text=answer.text, **_render_args(answer))


def render_tail(answer) -> list[dict]:
    """The blocks a streamed answer ends with (chat.stopStream): sources, footer, the 👍/👎 buttons."""
    return blocks.answer_tail(**_render_args(answer))


def question_team(db, *, channel: str | None, thread_ts: str | None = None) -> str | None:
    """The team a Slack question belongs to: its channel's, else (an assistant thread, or the agent view's DM) the
    team of the channel the user is looking at; None: no team's (shared rows only)."""
    team = team_for_channel(db, channel)
    if team is None and channel:
        # The thread's own context (assistant_view), else the DM's agent_view context (bot.assistant keeps it
        # under thread_ts "agent").
        context = ((assistant_thread_context(db, channel_id=channel, thread_ts=thread_ts) if thread_ts else None)
                   or assistant_thread_context(db, channel_id=channel, thread_ts="agent") or {})
        team = team_for_channel(db, context.get("channel_id"))
    return team


def _claim_delivery(rt: BotRuntime, body: dict, event: dict) -> bool:
    """True for the first delivery of this event and of the message it is about."""
    keys = [body["event_id"]] if body.get("event_id") else []
    if event.get("channel") and event.get("ts"):
        keys.append(f"msg:{event['channel']}:{event['ts']}")
    if keys and not claim_slack_events(rt.db(), keys):
        log.info("ignoring %s %s: already answered (retry %s)", event.get("type"), keys,
                 body.get("retry_attempt"))
        return False
    return True


def _answer_in_channel(rt: BotRuntime, client, *, question: str, user: str, channel: str,
                       thread_ts: str | None, event_id: str | None, team_id: str | None = None) -> None:
    """Stream the answer into its thread (bot.streaming); where there is no thread (a top-level DM), or while
    Slack refuses streaming: post "working on it", ask the engine, replace the placeholder with the answer
    (chat.update)."""
    if thread_ts and rt.streaming.allowed():
        _answer_streamed(rt, client, question=question, user=user, channel=channel, thread_ts=thread_ts,
                         event_id=event_id, team_id=team_id)
        return
    placeholder_ts = None
    try:
        rt.priority.wait_for_quiet()
        placeholder = client.chat_postMessage(channel=channel, thread_ts=thread_ts, text=messages.WORKING)
        placeholder_ts = placeholder["ts"]
        answer = rt.engine.answer(question, source="slack", user_id=user, channel_id=channel,
                                  thread_ts=thread_ts, event_id=event_id,
                                  team=question_team(rt.db(), channel=channel, thread_ts=thread_ts))
        if answer.interaction_id is not None:  # before the update: a vote may follow at once
            set_interaction_message(rt.db(), answer.interaction_id, channel_id=channel, message_ts=placeholder_ts,
                                    thread_ts=thread_ts)
        answer_blocks, text = render_answer(answer)
        rt.priority.wait_for_quiet()
        client.chat_update(channel=channel, ts=placeholder_ts, text=text, blocks=answer_blocks)
    except Exception as exc:  # noqa: BLE001 - Slack already has its 200; keep the error, tell the user
        def tell(note: str) -> None:
            if placeholder_ts:
                client.chat_update(channel=channel, ts=placeholder_ts, text=note, blocks=[])
            else:
                client.chat_postEphemeral(channel=channel, user=user, thread_ts=thread_ts, text=note)

        _report_failure(rt, exc, tell, user=user, channel=channel, event_id=event_id)


def _answer_streamed(rt: BotRuntime, client, *, question: str, user: str, channel: str, thread_ts: str,
                     event_id: str | None, team_id: str | None) -> None:
    """The engine's tokens streamed into the thread; the final message carries the sources and the buttons."""
    stream = AnswerStream(client, channel=channel, thread_ts=thread_ts, recipient_user_id=user,
                          recipient_team_id=team_id, interval_s=rt.config.stream_interval_s,
                          whole_as_one_message=rt.streaming.works)
    try:
        rt.priority.wait_for_quiet()
        stream.start()
        answer = rt.engine.answer(question, source="slack", user_id=user, channel_id=channel, thread_ts=thread_ts,
                                  event_id=event_id, on_text=stream.feed,
                                  team=question_team(rt.db(), channel=channel, thread_ts=thread_ts))
        full_blocks, text = render_answer(answer)
        rt.priority.wait_for_quiet()

        def remember(ts: str) -> None:  # before the buttons appear where possible: a vote may follow at once
            if answer.interaction_id is not None:
                set_interaction_message(rt.db(), answer.interaction_id, channel_id=channel, message_ts=ts,
                                        thread_ts=thread_ts)

        stream.finish(answer.text, tail_blocks=render_tail(answer), full_blocks=full_blocks, fallback_text=text,
                      on_ts=remember)
        if stream.streamed:
            rt.streaming.works = True
        elif stream.refused:
            rt.streaming.refused(stream.refused)
    except Exception as exc:  # noqa: BLE001 - Slack already has its 200; keep the error, tell the user
        stream.close()

        def tell(note: str) -> None:
            if stream.ts:  # the placeholder, or the streamed message: the note replaces it
                client.chat_update(channel=channel, ts=stream.ts, text=note, blocks=[])
            else:  # nothing in the thread yet: the note goes where the answer would have
                client.chat_postMessage(channel=channel, thread_ts=thread_ts, text=note)

        _report_failure(rt, exc, tell, user=user, channel=channel, event_id=event_id)


def _answer_slash(rt: BotRuntime, respond, *, question: str, user: str, channel: str) -> None:
    try:
        answer = rt.engine.answer(question, source="slack", user_id=user, channel_id=channel,
                                  team=question_team(rt.db(), channel=channel))
        answer_blocks, text = render_answer(answer)
        respond(text=text, blocks=answer_blocks, response_type="ephemeral", replace_original=False)
    except Exception as exc:  # noqa: BLE001
        _report_failure(rt, exc, lambda note: respond(text=note, response_type="ephemeral"), user=user,
                        channel=channel)


def _report_failure(rt: BotRuntime, exc: Exception, tell: Callable[[str], None], *, user: str, channel: str,
                    event_id: str | None = None) -> None:
    """A failed answer: keep the error under a reference, then `tell` the asker the note that quotes it."""
    ref = rt.record_error("answer", exc, event_id=event_id, user_id=user, channel_id=channel)
    try:
        tell(messages.ERROR_NOTE.format(ref=ref if ref is not None else "?"))
    except Exception:  # noqa: BLE001 - the error itself is kept; this one goes to the log
        log.exception("could not tell %s about the failure", user)


def question_event(rt: BotRuntime, *, body: dict, event: dict, context, client, in_thread: bool,
                   before_work=None) -> None:
    """A message that may be a question: filtered, claimed once, rate-limited, then answered by the answer
    pool. `before_work(question)` runs once the question is accepted, before the answer is worked on (the
    assistant surface sets its status line there)."""
    _question_event(rt, body=body, event=event, context=context, client=client, in_thread=in_thread,
                    before_work=before_work)


def _question_event(rt: BotRuntime, *, body: dict, event: dict, context, client, in_thread: bool,
                    before_work=None) -> None:
    bot_user_id = context.get("bot_user_id")
    why = ignored_event(event, bot_user_id=bot_user_id)
    if why:
        log.debug("ignoring %s event: %s", event.get("type"), why)
        return
    if not _claim_delivery(rt, body, event):
        return
    user, channel = event["user"], event["channel"]
    thread_ts = event.get("thread_ts") or (event["ts"] if in_thread else None)
    question = question_text(event.get("text", ""), bot_user_id=bot_user_id)
    is_dm = event.get("channel_type") == "im"

    def tell(text: str) -> None:
        if is_dm:
            client.chat_postMessage(channel=channel, thread_ts=thread_ts, text=text)
        else:
            client.chat_postEphemeral(channel=channel, user=user, thread_ts=thread_ts, text=text)

    if not question:
        tell(messages.EMPTY_QUESTION)
        return
    wait = rt.limiter.try_acquire(user)
    if wait:
        tell(messages.rate_limited(wait))
        return
    if before_work is not None:
        try:
            before_work(question)
        except Exception:  # noqa: BLE001 - a status line that could not be set must not cost the answer
            log.exception("could not set the status before answering")
    rt.answers.submit(_answer_in_channel, rt, client, question=question, user=user, channel=channel,
                      thread_ts=thread_ts, event_id=body.get("event_id"),
                      team_id=event.get("team") or body.get("team_id"))


def register_question_handlers(app: App, rt: BotRuntime) -> None:
    @app.event("app_mention")
    def on_app_mention(body, event, context, client):
        _question_event(rt, body=body, event=event, context=context, client=client, in_thread=True)

    @app.event("message")
    def on_message(body, event, context, client):
        # Only direct messages are questions here. In channels the bot answers mentions, which Slack also
        # sends as app_mention: answering `message` too would answer them twice.
        if event.get("channel_type") != "im":
            return
        _question_event(rt, body=body, event=event, context=context, client=client, in_thread=False)

    @app.command("/kb")
    @rt.after_ack
    def on_kb(ack, command, respond):
        question = blocks.plain_slack_text(command.get("text") or "").strip()
        user, channel = command.get("user_id"), command.get("channel_id")
        if not question:
            ack(text=messages.EMPTY_QUESTION, response_type="ephemeral")
            return
        wait = rt.limiter.try_acquire(user)
        if wait:
            ack(text=messages.rate_limited(wait), response_type="ephemeral")
            return
        ack(text=messages.SLASH_WORKING, response_type="ephemeral")
        rt.answers.submit(_answer_slash, rt, respond, question=question, user=user, channel=channel)

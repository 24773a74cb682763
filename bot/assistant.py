"""Slack's AI-app surface through slack-bolt's `Assistant` middleware (https://docs.slack.dev/ai/developing-agents).

- `assistant_thread_started`: the thread gets a title and suggested prompts: the questions asked most and
  👍'd most in the last `SUGGESTED_WEEKS` weeks (store.assistant_threads.suggested_questions), or
  messages.DEFAULT_PROMPTS while nothing was asked yet. The thread's context is kept.
- `assistant_thread_context_changed`: the new context (the channel the user is looking at) is kept in the
  store's `assistant_threads` (StoreThreadContextStore): the thread's questions belong to that channel's team
  (bot.questions.question_team), and its suggested prompts are the shared and that team's questions.
- a user's message in an assistant thread: the same question pipeline as mentions and DMs
  (bot.questions.question_event: filtered, claimed once, rate-limited), with the status line
  (assistant.threads.setStatus, rotating loading messages) set before the work starts, the thread titled
  by its first question, and the answer streamed into the thread (bot.streaming).

Slack's newer Agent messaging experience (`agent_view` in the manifest, for new apps) replaces the two
assistant_thread_* events by `app_home_opened` (tab "messages") and `app_context_changed`. slack-bolt 1.30's
Assistant class handles only the assistant_view events; what bolt 1.30 does offer for agent_view,
`set_suggested_prompts` on app_home_opened, is used here too, and app_context_changed is kept like a context
change. docs/slack.md says how to switch the manifest.
"""

from __future__ import annotations

import datetime as _dt
import logging

from slack_bolt import App, Assistant
from slack_bolt.context.assistant.thread_context import AssistantThreadContext
from slack_bolt.context.assistant.thread_context_store.store import AssistantThreadContextStore

import bot.messages as messages
from bot.questions import question_event
from bot.runtime import BotRuntime
from store.assistant_threads import assistant_thread_context, save_assistant_thread_context, suggested_questions
from store.interactions import thread_interactions
from store.teams import team_for_channel

log = logging.getLogger("kbloop.bot")

SUGGESTED_WEEKS = 4
MAX_PROMPTS = 4  # Slack shows at most four suggested prompts


class StoreThreadContextStore(AssistantThreadContextStore):
    """Assistant thread contexts in kbloop's store, not in a message's metadata (bolt's default store
    rewrites the bot's first reply with chat.update and reads it back with conversations.replies)."""

    def __init__(self, rt: BotRuntime):
        self.rt = rt

    def save(self, *, channel_id: str, thread_ts: str, context: dict[str, str]) -> None:
        save_assistant_thread_context(self.rt.db(), channel_id=channel_id, thread_ts=thread_ts, context=context)

    def find(self, *, channel_id: str, thread_ts: str) -> AssistantThreadContext | None:
        found = assistant_thread_context(self.rt.db(), channel_id=channel_id, thread_ts=thread_ts)
        return AssistantThreadContext(found) if found else None


def _short(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def suggested_prompts(rt: BotRuntime, *, now: _dt.datetime | None = None,
                      team: str | None = None) -> list[dict[str, str]]:
    """Up to four {"title", "message"} prompts: recent popular questions (shared ones and `team`'s: the team of
    the channel the user is looking at), else the defaults."""
    since = ((now or _dt.datetime.now(_dt.timezone.utc)) - _dt.timedelta(weeks=SUGGESTED_WEEKS)).isoformat()
    questions = (suggested_questions(rt.db(), since=since, limit=MAX_PROMPTS, team=team)
                 or list(messages.DEFAULT_PROMPTS))
    return [{"title": _short(q, messages.PROMPT_TITLE_CHARS), "message": q} for q in questions[:MAX_PROMPTS]]


def build_assistant(rt: BotRuntime) -> Assistant:
    assistant = Assistant(thread_context_store=StoreThreadContextStore(rt), logger=log)

    @assistant.thread_started
    def on_thread_started(payload, set_title, set_suggested_prompts):
        thread = payload.get("assistant_thread") or {}
        save_assistant_thread_context(rt.db(), channel_id=thread["channel_id"], thread_ts=thread["thread_ts"],
                                      context=thread.get("context") or {}, user_id=thread.get("user_id"))
        set_title(messages.ASSISTANT_TITLE)
        team = team_for_channel(rt.db(), (thread.get("context") or {}).get("channel_id"))
        set_suggested_prompts(prompts=suggested_prompts(rt, team=team), title=messages.SUGGESTED_TITLE)

    @assistant.thread_context_changed
    def on_context_changed(payload, save_thread_context):
        save_thread_context((payload.get("assistant_thread") or {}).get("context") or {})

    @assistant.user_message
    def on_user_message(body, payload, context, client, set_status, set_title):
        channel, thread_ts = payload["channel"], payload["thread_ts"]

        def before_work(question: str) -> None:
            set_status(status=messages.STATUS_WORKING, loading_messages=list(messages.LOADING_MESSAGES))
            if not thread_interactions(rt.db(), channel_id=channel, thread_ts=thread_ts):
                set_title(_short(question, messages.THREAD_TITLE_CHARS))  # a thread is named by its first question

        question_event(rt, body=body, event=payload, context=context, client=client, in_thread=True,
                       before_work=before_work)

    return assistant


def register_assistant_handlers(app: App, rt: BotRuntime) -> None:
    app.use(build_assistant(rt))

    @app.event("app_home_opened")
    def on_app_home_opened(event, context):
        # agent_view: a user opened the DM with the app (tab "messages"); bolt 1.30 attaches set_suggested_prompts.
        prompts_setter = context.get("set_suggested_prompts")
        if event.get("tab") == "messages" and prompts_setter is not None:
            prompts_setter(prompts=suggested_prompts(rt), title=messages.SUGGESTED_TITLE)

    @app.event("app_context_changed")
    def on_app_context_changed(event):
        # agent_view's context change (no bolt 1.30 helper): kept per user, like an assistant thread's context.
        user = event.get("user") or event.get("user_id") or ""
        context = event.get("context") or {k: v for k, v in event.items() if k not in ("type", "event_ts")}
        save_assistant_thread_context(rt.db(), channel_id=event.get("channel") or f"user:{user}", thread_ts="agent",
                                      context=context, user_id=user or None)

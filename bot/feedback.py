"""Slack listeners for feedback: 👍 and 👎 on an answer, and the correction modal a 👎 opens. Each vote is kept in
the store (store.interactions.record_vote); the person who voted gets an ephemeral thank-you.
"""

from __future__ import annotations

import json

from slack_bolt import App
from slack_sdk.webhook import WebhookClient

import bot.blocks as blocks
import bot.messages as messages
from bot.runtime import BotRuntime
from store import StoreError
from store.interactions import get_interaction, record_vote


def _interaction_id(value: str | None) -> int | None:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None


def _tell(text: str, *, response_url: str | None, client, channel: str | None, user: str) -> None:
    """An ephemeral note to one person: through the response_url when there is one (works in DMs and in
    channels the bot is not a member of), else chat.postEphemeral, else a DM."""
    if response_url:
        WebhookClient(response_url).send(text=text, response_type="ephemeral", replace_original=False)
    elif channel:
        client.chat_postEphemeral(channel=channel, user=user, text=text)
    else:
        client.chat_postMessage(channel=user, text=text)


def register_feedback_handlers(app: App, rt: BotRuntime) -> None:
    @app.action(blocks.ACTION_UP)
    @rt.after_ack
    def on_feedback_up(ack, body, action, client):
        ack()
        user = body["user"]["id"]
        channel = (body.get("channel") or {}).get("id")
        iid = _interaction_id(action.get("value"))
        try:
            if iid is None:
                raise StoreError(f"bad interaction id {action.get('value')!r}")
            record_vote(rt.db(), interaction_id=iid, user_id=user, vote=1)
            text = messages.THANKS_UP
        except StoreError:
            text = messages.UNKNOWN_INTERACTION
        _tell(text, response_url=body.get("response_url"), client=client, channel=channel, user=user)

    @app.action(blocks.ACTION_DOWN)
    @rt.after_ack
    def on_feedback_down(ack, body, action, client):
        ack()
        user = body["user"]["id"]
        channel = (body.get("channel") or {}).get("id")
        iid = _interaction_id(action.get("value"))
        try:
            interaction = get_interaction(rt.db(), iid) if iid is not None else None
        except StoreError:
            interaction = None
        if interaction is None:
            _tell(messages.UNKNOWN_INTERACTION, response_url=body.get("response_url"), client=client,
                  channel=channel, user=user)
            return
        # trigger_id lives 3 seconds: open the modal before anything else.
        view = blocks.correction_modal(interaction_id=interaction.id, question=interaction.question,
                                       metadata={"channel": channel, "response_url": body.get("response_url")})
        client.views_open(trigger_id=body["trigger_id"], view=view)
        # The 👎 counts even if the modal is closed without a correction.
        record_vote(rt.db(), interaction_id=interaction.id, user_id=user, vote=-1)

    @app.view(blocks.CORRECTION_CALLBACK)
    @rt.after_ack
    def on_correction_submitted(ack, body, view, client):
        user = body["user"]["id"]
        state = (view.get("state") or {}).get("values") or {}
        correction = ((state.get(blocks.CORRECTION_BLOCK) or {}).get(blocks.CORRECTION_ACTION) or {}).get("value")
        correction = (correction or "").strip()
        if len(correction) > messages.CORRECTION_MAX:
            ack(response_action="errors", errors={blocks.CORRECTION_BLOCK: messages.CORRECTION_TOO_LONG})
            return
        ack()
        try:
            meta = json.loads(view.get("private_metadata") or "{}")
        except ValueError:
            meta = {}
        iid = _interaction_id(meta.get("interaction_id"))
        try:
            if iid is None:
                raise StoreError("no interaction id in the modal")
            record_vote(rt.db(), interaction_id=iid, user_id=user, vote=-1, correction=correction or None)
            text = messages.THANKS_CORRECTION if correction else messages.THANKS_DOWN
        except StoreError:
            text = messages.UNKNOWN_INTERACTION
        _tell(text, response_url=meta.get("response_url"), client=client, channel=meta.get("channel"), user=user)

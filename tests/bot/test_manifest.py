"""bot/manifest.yml is a Slack app manifest with everything the bot listens to and needs, and nothing more."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "bot" / "manifest.yml"

# The bot scope each Web API method needs (https://api.slack.com/methods). A method missing here fails
# test_scopes_are_exactly_what_the_code_uses: look its scope up and add it.
METHOD_SCOPES = {
    "auth.test": None, "views.open": None,  # no scope needed
    "chat.postMessage": "chat:write", "chat.update": "chat:write", "chat.postEphemeral": "chat:write",
    # Streamed answers: slack_sdk's chat_stream helper calls chat.startStream / appendStream / stopStream.
    "chat.stream": "chat:write", "chat.startStream": "chat:write", "chat.appendStream": "chat:write",
    "chat.stopStream": "chat:write",
    "assistant.threads.setStatus": "assistant:write", "assistant.threads.setSuggestedPrompts": "assistant:write",
    "assistant.threads.setTitle": "assistant:write",
}
EVENT_SCOPES = {"app_mention": "app_mentions:read", "message.im": "im:history",
                "assistant_thread_started": "assistant:write", "assistant_thread_context_changed": "assistant:write"}
# Scopes no method call shows: slash commands, and DMs that chat.postMessage starts with a user id.
OTHER_SCOPES = {"commands", "im:write"}


def _web_api_methods_called() -> set[str]:
    """Every `client.chat_postMessage(` … in the code that talks to Slack, as Slack's method names."""
    calls = set()
    for path in list((ROOT / "bot").rglob("*.py")) + list((ROOT / "kbloop").rglob("*.py")):
        for family, name in re.findall(r"\.(auth|chat|views|conversations|users|reactions|assistant|files|pins|"
                                       r"team|bookmarks|usergroups|apps)_([A-Za-z]+)\(", path.read_text()):
            calls.add(f"{family}.{name}")
    return calls


def test_manifest_declares_scopes_events_commands_and_interactivity():
    m = yaml.safe_load(MANIFEST.read_text())
    settings = m["settings"]
    assert set(settings["event_subscriptions"]["bot_events"]) == {
        "app_mention", "message.im", "assistant_thread_started", "assistant_thread_context_changed"}
    assert m["features"]["assistant_view"]["assistant_description"]  # the AI-app feature
    assert settings["interactivity"]["is_enabled"] is True
    assert "socket_mode_enabled" in settings
    commands = {c["command"]: c for c in m["features"]["slash_commands"]}
    assert set(commands) == {"/kb", "/kb-status", "/kb-retrain", "/kb-rollback"}
    urls = {c["url"] for c in commands.values()} | {settings["event_subscriptions"]["request_url"],
                                                     settings["interactivity"]["request_url"]}
    assert urls == {"https://YOUR-HOST/slack/events"}
    assert m["features"]["app_home"]["messages_tab_enabled"] is True  # users can DM the bot


def test_scopes_are_exactly_what_the_code_uses():
    m = yaml.safe_load(MANIFEST.read_text())
    called = _web_api_methods_called()
    assert {"chat.postMessage", "chat.update", "views.open"} <= called  # the scan finds the calls
    unknown = called - set(METHOD_SCOPES)
    assert not unknown, f"add the scope of {sorted(unknown)} to METHOD_SCOPES (and to the manifest)"
    needed = {METHOD_SCOPES[c] for c in called} - {None}
    needed |= {EVENT_SCOPES[e] for e in m["settings"]["event_subscriptions"]["bot_events"]} | OTHER_SCOPES
    assert set(m["oauth_config"]["scopes"]["bot"]) == needed
    assert not {"reactions:write", "users:read"} & set(m["oauth_config"]["scopes"]["bot"])

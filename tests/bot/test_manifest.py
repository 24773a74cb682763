"""bot/manifest.yml is a Slack app manifest with everything the bot listens to and needs."""

from pathlib import Path

import yaml

MANIFEST = Path(__file__).resolve().parents[2] / "bot" / "manifest.yml"


def test_manifest_declares_scopes_events_commands_and_interactivity():
    m = yaml.safe_load(MANIFEST.read_text())
    scopes = set(m["oauth_config"]["scopes"]["bot"])
    assert {"app_mentions:read", "chat:write", "commands", "im:history", "im:read", "im:write",
            "reactions:write", "users:read"} <= scopes
    settings = m["settings"]
    assert set(settings["event_subscriptions"]["bot_events"]) == {"app_mention", "message.im"}
    assert settings["interactivity"]["is_enabled"] is True
    assert "socket_mode_enabled" in settings
    commands = {c["command"]: c for c in m["features"]["slash_commands"]}
    assert set(commands) == {"/kb", "/kb-status", "/kb-retrain", "/kb-rollback"}
    urls = {c["url"] for c in commands.values()} | {settings["event_subscriptions"]["request_url"],
                                                     settings["interactivity"]["request_url"]}
    assert urls == {"https://YOUR-HOST/slack/events"}
    assert m["features"]["app_home"]["messages_tab_enabled"] is True  # users can DM the bot

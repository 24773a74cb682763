"""Small pieces: config from settings, the rate limiter, question cleaning, event filtering, retrain args."""

from __future__ import annotations

import pytest

from bot import BotConfig, BotConfigError
from bot.commands import parse_retrain_args
from bot.questions import ignored_event, question_text
from bot.ratelimit import QuestionRateLimiter
from kbloop.settings import load_settings


def test_config_from_settings(monkeypatch):
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-1")
    monkeypatch.setenv("SLACK_SIGNING_SECRET", "s")
    monkeypatch.setenv("KBLOOP_ADMINS", "U1, U2")
    monkeypatch.setenv("KBLOOP_NOTIFY_CHANNEL", "C9")
    monkeypatch.setenv("KBLOOP_SLACK_API_URL", "http://127.0.0.1:1/api")
    config = BotConfig.from_settings(load_settings())
    assert config.admins == ("U1", "U2") and config.notify_channel == "C9"
    assert config.api_url == "http://127.0.0.1:1/api/" and config.is_admin("U2") and not config.is_admin("U3")


def test_socket_mode_needs_no_signing_secret(monkeypatch):
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-1")
    monkeypatch.setenv("SLACK_APP_TOKEN", "xapp-1")
    assert BotConfig.from_settings(load_settings(), http=False).signing_secret is None
    with pytest.raises(BotConfigError, match="SLACK_SIGNING_SECRET"):
        BotConfig.from_settings(load_settings(), http=True)


def test_rate_limiter_sliding_window():
    now = [0.0]
    limiter = QuestionRateLimiter(max_questions=2, window_s=60, clock=lambda: now[0])
    assert limiter.try_acquire("U1") == 0 and limiter.try_acquire("U1") == 0
    assert limiter.try_acquire("U1") == 60
    assert limiter.try_acquire("U2") == 0  # per user
    now[0] = 30
    assert limiter.try_acquire("U1") == 30
    now[0] = 60.5
    assert limiter.try_acquire("U1") == 0


def test_question_text_strips_our_mention_and_unescapes():
    assert question_text("<@UBOT> is 1 &lt; 2 &amp;&amp; <@U9> ok?", bot_user_id="UBOT") == "is 1 < 2 && @U9 ok?"
    assert question_text("<@UBOT|kbloop>   ", bot_user_id="UBOT") == ""


def test_links_channels_and_groups_in_a_question_read_as_the_user_saw_them():
    """Slack sends what the user saw as `wiki page` as <https://…|wiki page>: retrieval and the model must see the
    words, not the markup (Slack's formatting reference)."""
    cases = {
        "<@UBOT> Is <https://wiki.example.com/vpn|the VPN page> still right?": "Is the VPN page still right?",
        "<@UBOT> what does <https://wiki.example.com/vpn> say about MFA?": "what does https://wiki.example.com/vpn say "
                                                                         "about MFA?",
        "<@UBOT> 在 <#C0OPS|ops-仓库> 里说的叉车证多久复审？": "在 #ops-仓库 里说的叉车证多久复审？",
        "<@UBOT> should <!subteam^S0OPS|@warehouse-leads> sign this?": "should @warehouse-leads sign this?",
        "<@UBOT> can <!here> see <#C0PRIVATE|> and mail <mailto:it@example.com|it@example.com>?":
            "can @here see #C0PRIVATE and mail it@example.com?",
        "<@UBOT> A &lt;b&gt; tag &amp; <https://x.example/a?b=1&amp;c=2|a &amp; b>": "A <b> tag & a & b",
    }
    for text, question in cases.items():
        assert question_text(text, bot_user_id="UBOT") == question


@pytest.mark.parametrize("event,ignored", [
    ({"type": "message", "user": "U1", "text": "hi"}, False),
    ({"type": "message", "user": "UBOT", "text": "hi"}, True),
    ({"type": "message", "bot_id": "B1", "user": "U1"}, True),
    ({"type": "message", "subtype": "message_changed"}, True),
    ({"type": "message", "subtype": "message_deleted"}, True),
    ({"type": "app_mention", "user": "U1", "edited": {"user": "U1", "ts": "1"}}, True),
])
def test_ignored_events(event, ignored):
    assert (ignored_event(event, bot_user_id="UBOT") is not None) == ignored


def test_parse_retrain_args():
    assert parse_retrain_args("") == {}
    assert parse_retrain_args("force method=lora rank=16 learning_rate=0.0001") == {
        "force": True, "train": {"method": "lora", "rank": 16, "learning_rate": 0.0001}}
    with pytest.raises(ValueError):
        parse_retrain_args("rank")


def test_socket_mode_handler_accepts_the_app(fake_slack, db_path):
    """Socket Mode reuses the app's client (so KBLOOP_SLACK_API_URL applies) and skips signature checks."""
    from slack_bolt.adapter.socket_mode import SocketModeHandler

    from bot import build_app

    config = BotConfig(bot_token="xoxb-1", signing_secret=None, app_token="xapp-1", api_url=fake_slack.url)
    app = build_app(config=config, engine=None, db_path=db_path)
    handler = SocketModeHandler(app, config.app_token)
    assert handler.client.web_client.base_url == fake_slack.url
    assert handler.client.app_token == "xapp-1"

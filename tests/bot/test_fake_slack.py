"""The fake Slack Web API behaves like Slack where tests rely on it (other helpers' tests use it too)."""

from __future__ import annotations

import pytest
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.signature import SignatureVerifier

from tests.fakes.slack_api import FakeSlackAPI, interactive_body, sign_request


def test_signatures_verify_with_slack_sdk_and_stale_ones_do_not():
    body = interactive_body({"type": "block_actions"})
    verifier = SignatureVerifier("s3cret")
    assert verifier.is_valid_request(body, sign_request(body, "s3cret"))
    assert not verifier.is_valid_request(body, sign_request(body, "other"))
    assert not verifier.is_valid_request(body, sign_request(body, "s3cret", timestamp=1_600_000_000))


def test_records_updates_and_enforces_limits(fake_slack: FakeSlackAPI):
    client = WebClient(token="xoxb-x", base_url=fake_slack.url)
    ts = client.chat_postMessage(channel="C1", text="working")["ts"]
    client.chat_update(channel="C1", ts=ts, text="done", blocks=[{"type": "section", "text": {"type": "mrkdwn", "text": "done"}}])
    assert fake_slack.messages("C1")[0]["text"] == "done"
    with pytest.raises(SlackApiError, match="invalid_blocks"):
        client.chat_postMessage(channel="C1", text="x", blocks=[{"type": "divider"}] * 51)
    with pytest.raises(SlackApiError, match="message_not_found"):
        client.chat_update(channel="C1", ts="1.2", text="x")
    with pytest.raises(SlackApiError, match="not_authed"):
        WebClient(base_url=fake_slack.url).chat_postMessage(channel="C1", text="x")
    assert len(fake_slack.requests("/api/chat.postMessage")) == 3


def test_wait_for_times_out_with_what_it_saw(fake_slack: FakeSlackAPI):
    WebClient(token="xoxb-x", base_url=fake_slack.url).auth_test()
    with pytest.raises(AssertionError, match=r"chat.update.*auth.test"):
        fake_slack.wait_for("chat.update", 1, timeout=0.2)


def test_rate_limit_once_then_ok(fake_slack: FakeSlackAPI):
    fake_slack.fail_next("chat.postMessage", retry_after=0)
    client = WebClient(token="xoxb-x", base_url=fake_slack.url)
    with pytest.raises(SlackApiError) as info:
        client.chat_postMessage(channel="C1", text="x")  # no retry handler: the 429 surfaces
    assert info.value.response.status_code == 429 and info.value.response.headers["Retry-After"] == "0"
    assert client.chat_postMessage(channel="C1", text="x")["ok"]

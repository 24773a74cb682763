"""Hostile input at the bot's doors (issue 16): /slack/events and /healthz over real HTTP on loopback.

The bot runs as in production (bolt app, uvicorn, the store, the fake Slack Web API from tests/fakes);
requests are signed with Slack's v0 scheme as Slack signs them (tests.fakes.slack_api.sign_request, the
same HMAC slack_sdk's SignatureVerifier checks), payloads follow Slack's docs. Nothing of ours is stubbed.
"""

from __future__ import annotations

import json
import select
import socket
import time
import tracemalloc
import urllib.error
import urllib.request

import pytest

from bot.verification import MAX_AGE_S, MAX_BODY_BYTES, RecentSignatures, Refused
from store.adapters import activate_adapter, active_adapter, register_adapter
from store.audit import list_audit
from store.interactions import list_interactions
from store.jobs import claim_next_job, enqueue_job, finish_job, list_jobs, set_job_progress
from store.slack_inbox import count_pending_slack_events
from tests.bot.conftest import ADMIN, SECRET, SETTLE_S, fake_slack, start_bot  # noqa: F401 - fixtures
from tests.fakes.engine import ScriptedEngine
from tests.fakes.slack_api import (
    BOT_USER_ID,
    app_mention_event,
    event_body,
    interactive_body,
    post_signed,
    sign_request,
    slash_command_body,
)

MENTION = f"<@{BOT_USER_ID}> how do I get VPN access?"


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def _nothing_happened(bot, slack) -> None:
    time.sleep(SETTLE_S)  # a (wrong) late effect would show up by now (tests/bot/conftest.py says why it is enough)
    assert slack.requests() == []
    assert list_interactions(bot.db) == [] and list_jobs(bot.db) == [] and list_audit(bot.db) == []
    assert count_pending_slack_events(bot.db) == 0


def _raw_exchange(port: int, head: bytes, chunks, *, read_timeout: float = 10.0) -> tuple[int, int]:
    """Send `head` then `chunks` on one connection, stopping as soon as the server answers.
    Returns (status, bytes of body sent)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        sock.sendall(head)
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # the answer is here: the server stopped reading
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        data = b""
        while b"\r\n" not in data:
            part = sock.recv(4096)
            if not part:
                break
            data += part
    return int(data.split(b" ", 2)[1]), sent


# --- 2: acknowledged events survive a restart -----------------------------------------------------

def test_acknowledged_event_is_answered_after_a_restart_once(start_bot, fake_slack, db_path):
    bot = start_bot()
    [dispatcher] = bot.app.kbloop.dispatchers
    dispatcher.stop()  # the process goes down after the ack, before the event is handled
    sent_at = int(time.time()) - (MAX_AGE_S - 2)  # by the restart it is older than Slack's 5-minute window
    body = event_body(app_mention_event(text=MENTION, ts="1711111111.000100"), event_id="EvInbox")
    assert post_signed(bot.events_url, body, SECRET, timestamp=sent_at)[0] == 200
    assert count_pending_slack_events(bot.db) == 1
    bot.stop()
    assert fake_slack.requests("chat.postMessage") == []
    while time.time() <= sent_at + MAX_AGE_S + 1:
        time.sleep(0.1)

    restarted = start_bot(engine=ScriptedEngine(db_path, ready=False))
    time.sleep(SETTLE_S)
    assert fake_slack.requests("chat.postMessage") == []  # held until the model is loaded, not "ask again"
    restarted.engine.ready = True
    update = fake_slack.wait_for("chat.update", 1)[0].params
    assert update["channel"] == "C123" and "feedback_up" in json.dumps(update["blocks"])
    # Slack's own retry of the same event (new timestamp, so a new signature) changes nothing.
    assert post_signed(restarted.events_url, body, SECRET, retry_num=1)[0] == 200
    time.sleep(SETTLE_S)
    assert len(fake_slack.requests("chat.postMessage")) == 1
    assert len(restarted.engine.calls) == 1 and restarted.engine.calls[0]["event_id"] == "EvInbox"
    assert count_pending_slack_events(restarted.db) == 0


def test_retry_of_an_event_still_waiting_adds_nothing(start_bot, fake_slack):
    bot = start_bot()
    bot.app.kbloop.dispatchers[0].stop()
    body = event_body(app_mention_event(text=MENTION), event_id="EvTwice")
    assert post_signed(bot.events_url, body, SECRET)[0] == 200
    assert post_signed(bot.events_url, body, SECRET, retry_num=1, timestamp=int(time.time()) + 1)[0] == 200
    assert count_pending_slack_events(bot.db) == 1


# --- 8: body size, signature before parsing -------------------------------------------------------

def _head(port: int, headers: dict[str, str]) -> bytes:
    lines = ["POST /slack/events HTTP/1.1", f"Host: 127.0.0.1:{port}"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_declared_oversized_body_is_refused_before_it_is_read(start_bot, fake_slack):
    bot = start_bot()
    port = bot.server.port
    headers = sign_request(b"{}", SECRET) | {"Content-Length": str(100 * 1024 * 1024)}
    status, sent = _raw_exchange(port, _head(port, headers), (b"x" * 65536 for _ in range(1600)))
    assert status == 413
    assert sent < 8 * 1024 * 1024  # answered long before 100 MiB went over the wire
    _nothing_happened(bot, fake_slack)


def test_streamed_oversized_body_is_read_only_up_to_the_cap(start_bot, fake_slack):
    bot = start_bot()
    port = bot.server.port
    headers = sign_request(b"{}", SECRET) | {"Transfer-Encoding": "chunked"}
    chunk = b"%x\r\n" % 65536 + b"x" * 65536 + b"\r\n"  # one object, sent 128 times: 8 MiB in all
    tracemalloc.start()
    try:
        status, sent = _raw_exchange(port, _head(port, headers), (chunk for _ in range(128)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 413
    # What the client managed to write lies in socket buffers; what counts is what the server allocated.
    print(f"oversized chunked body: {sent / 2**20:.1f} MiB sent, peak {peak / 2**20:.2f} MiB allocated")
    assert peak < 3 * MAX_BODY_BYTES, f"{peak / 2**20:.1f} MiB allocated for an oversized body"
    _nothing_happened(bot, fake_slack)


def test_body_at_the_cap_is_still_read(start_bot, fake_slack):
    bot = start_bot()
    text = "x" * (MAX_BODY_BYTES - 600)
    body = slash_command_body(command="/kb-status", text=text, response_url=fake_slack.response_url("big"))
    assert len(body) <= MAX_BODY_BYTES
    assert post_signed(bot.events_url, body, SECRET)[0] == 200
    fake_slack.wait_for("response_url:big", 1)


def test_wrong_signature_is_refused_before_the_body_is_parsed(start_bot, fake_slack):
    bot = start_bot()
    status, text = post_signed(bot.events_url, b'{"type": "event_callback", "event_id": ', "not-the-secret")
    assert status == 401 and "Signature does not match" in json.loads(text)["error"]
    _nothing_happened(bot, fake_slack)


# --- 9: malformed headers and bodies --------------------------------------------------------------

@pytest.mark.parametrize("timestamp", ["abc", "", "1e9", "-5", "１２３"])
@pytest.mark.parametrize("kind", ["event", "command"])
def test_malformed_timestamp_is_401_not_a_crash(start_bot, fake_slack, timestamp, kind):
    bot = start_bot()
    body = (event_body(app_mention_event(text=MENTION)) if kind == "event"
            else slash_command_body(command="/kb-rollback", user=ADMIN))
    headers = sign_request(body, SECRET) | {"X-Slack-Request-Timestamp": timestamp}
    status, text = _post(bot.events_url, body, {k: v.encode("utf-8").decode("latin-1") for k, v in headers.items()})
    assert status == 401 and "Traceback" not in text
    assert "X-Slack-Request-Timestamp" in json.loads(text)["error"] or "unsigned" in json.loads(text)["error"]
    _nothing_happened(bot, fake_slack)


@pytest.mark.parametrize("body", [
    b'{"type": "event_callback", "event_id": "Ev1", "event": {',  # cut short
    b'{"type": "event_callback", "event_id": "Ev1"}',  # no event
    b'{"type": "event_callback", "event_id": 7, "event": {}}',
    b"[1, 2, 3]",
    b"payload=%7Bnot+json",
    b"payload=%5B1%2C2%5D",  # payload=[1,2]
    b"\xff\xfe\x00garbage",
    b"no form here",
], ids=["truncated_json", "no_event", "event_id_not_text", "json_list", "payload_not_json", "payload_list",
        "not_utf8", "not_a_form"])
def test_signed_malformed_body_is_400_not_a_crash(start_bot, fake_slack, body):
    bot = start_bot()
    status, text = post_signed(bot.events_url, body, SECRET)
    assert status == 400 and "Traceback" not in text
    assert json.loads(text)["error"]
    _nothing_happened(bot, fake_slack)


# --- 10: replays ----------------------------------------------------------------------------------

def _three_adapters(db):
    for v in ("v1", "v2", "v3"):
        register_adapter(db, version=v, path=f"/x/{v}", base_model="tiny", method="lora", params={},
                         dataset_hash=None, dataset_size=3, metrics={})
        activate_adapter(db, v)


def test_replayed_rollback_is_refused(start_bot, fake_slack):
    bot = start_bot()
    _three_adapters(bot.db)
    body = slash_command_body(command="/kb-rollback", user=ADMIN, response_url=fake_slack.response_url("rb"))
    sent_at = int(time.time())
    assert post_signed(bot.events_url, body, SECRET, timestamp=sent_at)[0] == 200
    fake_slack.wait_for("response_url:rb", 1)
    status, text = post_signed(bot.events_url, body, SECRET, timestamp=sent_at)  # the same bytes and headers
    assert status == 401 and "replayed" in json.loads(text)["error"]
    time.sleep(SETTLE_S)
    assert active_adapter(bot.db).version == "v2"  # rolled back once, from v3
    assert [a["action"] for a in list_audit(bot.db)].count("rollback") == 1
    # A new request from Slack (a new timestamp, so a new signature) is not a replay.
    assert post_signed(bot.events_url, body, SECRET, timestamp=sent_at + 1)[0] == 200
    fake_slack.wait_for("response_url:rb", 2)
    assert active_adapter(bot.db).version == "v1"


def test_replayed_button_click_is_refused(start_bot, fake_slack):
    from tests.fakes.slack_api import block_actions_payload

    bot = start_bot()
    body = interactive_body(block_actions_payload(action_id="feedback_up", value="1"))
    sent_at = int(time.time())
    assert post_signed(bot.events_url, body, SECRET, timestamp=sent_at)[0] == 200
    assert post_signed(bot.events_url, body, SECRET, timestamp=sent_at)[0] == 401


def test_slack_retries_of_an_event_are_not_refused_and_answer_once(start_bot, fake_slack):
    bot = start_bot()
    body = event_body(app_mention_event(text=MENTION), event_id="EvRetry")
    sent_at = int(time.time())
    assert post_signed(bot.events_url, body, SECRET, timestamp=sent_at)[0] == 200
    # Slack retries immediately after a failed delivery: within the same second the signature is the same.
    assert post_signed(bot.events_url, body, SECRET, timestamp=sent_at, retry_num=1)[0] == 200
    assert post_signed(bot.events_url, body, SECRET, timestamp=sent_at + 60, retry_num=2)[0] == 200
    # The same signature without Slack's retry header is a copy, not a retry.
    assert post_signed(bot.events_url, body, SECRET, timestamp=sent_at)[0] == 401
    fake_slack.wait_for("chat.update", 1)
    time.sleep(SETTLE_S)
    assert len(fake_slack.requests("chat.postMessage")) == 1 and len(bot.engine.calls) == 1


def test_remembered_signatures_are_bounded_and_expire():
    now = [1_000_000.0]
    seen = RecentSignatures(max_size=3, clock=lambda: now[0])
    for i in range(5):
        seen.check_fresh(f"v0={i}", int(now[0]))
    assert len(seen) <= 4  # the bound, plus the one just added
    seen.check_fresh("v0=fresh", int(now[0]))
    with pytest.raises(Refused, match="replayed"):
        seen.check_fresh("v0=fresh", int(now[0]))
    now[0] += MAX_AGE_S + 1  # its timestamp is now outside the window: the door refuses it as stale anyway
    seen.check_fresh("v0=later", int(now[0]))
    assert len(seen) == 1


# --- 11: unsigned traffic does not slow real work -------------------------------------------------

def test_unsigned_requests_do_not_count_as_slack_traffic(start_bot, fake_slack):
    bot = start_bot()
    priority = bot.app.kbloop.priority
    before = priority._last_request
    body = event_body(app_mention_event(text=MENTION))
    for _ in range(20):
        assert _post(bot.events_url, body, {"Content-Type": "application/json"})[0] == 401
        assert post_signed(bot.events_url, body, "not-the-secret")[0] == 401
    assert priority._last_request == before  # background work was never asked to step aside for them
    assert post_signed(bot.events_url, body, SECRET)[0] == 200
    assert priority._last_request > before


# --- 12: /kb-retrain options checked when typed ---------------------------------------------------

def _command(bot, slack, command, *, user, text="", name="reply"):
    body = slash_command_body(command=command, text=text, user=user, response_url=slack.response_url(name))
    assert post_signed(bot.events_url, body, SECRET)[0] == 200
    return slack.wait_for(f"response_url:{name}", 1)[-1].params["text"]


@pytest.mark.parametrize("text, expected", [
    ("epochs=1e9", "epochs must be positive and at most"),
    ("max_length=100000000", "max length must be from 64 to"),
    ("version=active", "version 'active'"),
    ("base=/tmp/x", "cannot be chosen from Slack"),
    ("epochs=abc", "epochs must be a number"),
    ("rank=0", "rank must be a positive"),
    ("rank=128", "rank 128 is above 64"),
    ("lr=5", "learning rate must be in (0, 1)"),
    ("from=../../etc", "from must be `active`, `base` or an adapter version"),
    ("colour=blue", "unknown option colour"),
])
def test_bad_retrain_options_are_refused_when_typed(start_bot, fake_slack, text, expected):
    bot = start_bot()
    reply = _command(bot, fake_slack, "/kb-retrain", user=ADMIN, text=text)
    assert expected in reply.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    assert "Usage" in reply
    assert list_jobs(bot.db) == []


def test_retrain_options_follow_kbloop_train_rules(start_bot, fake_slack):
    """The refusal is the very text `kbloop train` gives for the same setting (finetune.training.config.check_settings)."""
    from finetune.training.config import TrainConfig, check_settings
    from store import ConfigError

    bot = start_bot()
    with pytest.raises(ConfigError) as info:
        check_settings(TrainConfig(max_length=100000000))
    assert str(info.value) in _command(bot, fake_slack, "/kb-retrain", user=ADMIN, text="max_length=100000000")


def test_good_retrain_options_are_queued(start_bot, fake_slack):
    bot = start_bot()
    reply = _command(bot, fake_slack, "/kb-retrain", user=ADMIN,
                     text="force method=lora rank=auto epochs=2 lr=1e-4 from=base")
    [job] = list_jobs(bot.db)
    assert f"#{job.id}" in reply
    assert job.params == {"force": True, "train": {"method": "lora", "rank": "auto", "epochs": 2,
                                                   "learning_rate": 1e-4, "start_from": "base"}}


# --- 13: error details only for admins ------------------------------------------------------------

SERVER_ERROR = ("the training process exited with status 1: RuntimeError: boom in /srv/kbloop/finetune/training/trainer.py; "
                "see /srv/kbloop-data/jobs/1/child.log")


def test_status_shows_employees_a_short_reason_and_admins_the_details(start_bot, fake_slack):
    bot = start_bot()
    failed = enqueue_job(bot.db, requester=ADMIN)
    claim_next_job(bot.db, worker_id="w1")
    finish_job(bot.db, failed.id, status="failed", error=SERVER_ERROR)
    running = enqueue_job(bot.db, requester=ADMIN)
    claim_next_job(bot.db, worker_id="w1")
    set_job_progress(bot.db, running.id, {"phase": "evaluating", "detail": "evaluating /srv/kbloop-data/adapters/v3"})

    employee = _command(bot, fake_slack, "/kb-status", user="U123", name="employee")
    assert "failed: the training process exited with status 1" in employee and "evaluating" in employee
    assert "/srv" not in employee and "RuntimeError" not in employee and "child.log" not in employee

    admin = _command(bot, fake_slack, "/kb-status", user=ADMIN, name="admin")
    assert "/srv/kbloop-data/jobs/1/child.log" in admin and "RuntimeError: boom" in admin
    assert "evaluating /srv/kbloop-data/adapters/v3" in admin


def test_failed_job_notice_in_channels_has_no_server_details(db, fake_slack):
    from bot import BotConfig, SlackJobNotifier, make_web_client

    config = BotConfig(bot_token="xoxb-test", signing_secret=None, api_url=fake_slack.url, notify_channel="CNOTIFY")
    notifier = SlackJobNotifier(client=make_web_client(config), notify_channel="CNOTIFY")
    job = enqueue_job(db, requester=ADMIN, reply_channel="C123")
    notifier.job_finished(job, {"status": "failed", "error": SERVER_ERROR, "reasons": [SERVER_ERROR]})
    posts = fake_slack.requests("chat.postMessage")
    assert {p.params["channel"] for p in posts} == {"C123", "CNOTIFY"}
    for post in posts:
        assert "exited with status 1" in post.params["text"]
        assert "/srv" not in post.params["text"] and "RuntimeError" not in post.params["text"]


def test_healthz_names_no_exception_text(start_bot, db_path):
    engine = ScriptedEngine(db_path, ready=False)
    engine.error = "OSError: /srv/models/qwen/config.json: Permission denied"
    bot = start_bot(engine=engine)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(bot.server.url + "/healthz", timeout=10)
    text = info.value.read().decode()
    assert info.value.code == 503
    assert json.loads(text) == {"ok": False, "store": "ok", "model": "failed"}
    assert "/srv" not in text and "OSError" not in text

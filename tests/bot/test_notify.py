"""SlackJobNotifier against the fake Slack: where notices go, progress edited in place, DM fallback."""

from __future__ import annotations

from bot import BotConfig, SlackJobNotifier, make_web_client
from store.jobs import enqueue_job, get_job


def _notifier(fake_slack, clock=None, **kw):
    config = BotConfig(bot_token="xoxb-test", signing_secret=None, api_url=fake_slack.url, notify_channel="CNOTIFY")
    return SlackJobNotifier(client=make_web_client(config), notify_channel="CNOTIFY", progress_interval_s=10,
                            clock=clock or (lambda: 0.0), **kw)


def test_notices_go_to_requester_channel_and_notify_channel(db, fake_slack):
    job = enqueue_job(db, requester="UADMIN", reply_channel="C123")
    now = [0.0]
    n = _notifier(fake_slack, clock=lambda: now[0])
    n.job_started(job)
    assert {r.params["channel"] for r in fake_slack.requests("chat.postMessage")} == {"C123", "CNOTIFY"}
    for step in range(1, 4):  # 3 progress reports within 10 s: one message per place
        now[0] = step
        n.job_progress(job, {"phase": "training", "step": step, "total": 30, "loss": 2.5})
    now[0] = 20
    n.job_progress(job, {"phase": "training", "step": 20, "total": 30, "loss": 1.5})
    progress_posts = [r for r in fake_slack.requests("chat.postMessage") if "step" in r.params["text"]]
    assert len(progress_posts) == 2 and len(fake_slack.requests("chat.update")) == 2
    assert "20/30" in fake_slack.requests("chat.update")[0].params["text"]
    n.job_finished(job, {"status": "succeeded", "version": "v2", "promoted": True, "reasons": ["loss <better>"],
                         "table": "metric  v2  v1\nheld-out loss  1.2  1.5"})
    final = fake_slack.requests("chat.postMessage")[-1].params
    assert "*v2*" in final["text"] and "now answering" in final["text"]
    assert "&lt;better&gt;" in final["text"] and "```" in final["text"] and "held-out loss" in final["text"]


def test_falls_back_to_a_dm_when_the_channel_is_unreachable(db, fake_slack):
    job = enqueue_job(db, requester="UADMIN", reply_channel="CPRIVATE")
    n = _notifier(fake_slack)
    n.notify_channel = None
    fake_slack.fail_next("chat.postMessage", status=200, retry_after=None, error="not_in_channel")
    n.job_finished(job, {"status": "failed", "error": "CUDA <out> of memory"})
    posts = fake_slack.requests("chat.postMessage")
    assert [p.params["channel"] for p in posts] == ["CPRIVATE", "UADMIN"]
    assert "failed" in posts[-1].params["text"] and "&lt;out&gt;" in posts[-1].params["text"]


def test_a_slack_outage_never_raises(db, fake_slack):
    job = get_job(db, enqueue_job(db, requester="U1", reply_channel="C1").id)
    n = _notifier(fake_slack)
    fake_slack.set_response("chat.postMessage", {"ok": False, "error": "fatal_error"})
    n.job_started(job)
    n.job_progress(job, {"phase": "training"})
    n.job_finished(job, {"status": "cancelled"})
    assert len(fake_slack.requests("chat.postMessage")) >= 3

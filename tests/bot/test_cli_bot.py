"""`kbloop bot`: one clear line for missing settings, a wrong token, an unreachable Slack; and the real
command serving a signed mention end to end (slow: a subprocess loading the tiny base)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from kbloop.cli import app
from kbloop.cli.app import run
from tests.bot.conftest import SECRET
from tests.conftest import small_sample_kb
from tests.fakes.slack_api import BOT_USER_ID, app_mention_event, event_body, post_signed

REPO = Path(__file__).resolve().parents[2]


def _kbloop(capsys, *args):
    capsys.readouterr()
    code = run(app, list(args))
    return code, capsys.readouterr().err


def test_missing_bot_token_is_named(capsys):
    code, err = _kbloop(capsys, "bot", "--http")
    assert code == 1 and err.count("\n") == 1 and "SLACK_BOT_TOKEN is not set" in err


def test_missing_signing_secret_is_named_in_http_mode(capsys, monkeypatch):
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-test")
    code, err = _kbloop(capsys, "bot")
    assert code == 1 and err.count("\n") == 1 and "SLACK_SIGNING_SECRET is not set" in err


def test_refused_token_is_one_line(capsys, monkeypatch, fake_slack):
    _kbloop(capsys, "init")
    fake_slack.set_response("auth.test", {"ok": False, "error": "invalid_auth"})
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-wrong")
    monkeypatch.setenv("SLACK_SIGNING_SECRET", SECRET)
    monkeypatch.setenv("KBLOOP_SLACK_API_URL", fake_slack.url)
    code, err = _kbloop(capsys, "bot", "--http")
    assert code == 1 and "SLACK_BOT_TOKEN was refused by Slack (invalid_auth)" in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_kbloop_bot_http_serves_health_and_answers(fake_slack, kbloop_home, tmp_path):
    env = {**os.environ, "SLACK_BOT_TOKEN": "xoxb-test", "SLACK_SIGNING_SECRET": SECRET,
           "KBLOOP_SLACK_API_URL": fake_slack.url, "PYTHONPATH": str(REPO)}
    kbloop = [sys.executable, "-m", "kbloop.cli"] if (REPO / "kbloop" / "cli" / "__main__.py").exists() else \
        [sys.executable, "-c", "from kbloop.cli import main; main()"]
    subprocess.run(kbloop + ["init"], env=env, check=True, capture_output=True, cwd=tmp_path)
    kb = small_sample_kb(tmp_path / "kb")  # the bot embeds what it searches: a few documents, not the whole KB
    subprocess.run(kbloop + ["kb", "import", str(kb), "--no-embed"], env=env, check=True,
                   capture_output=True, cwd=tmp_path)
    port = _free_port()
    proc = subprocess.Popen(kbloop + ["bot", "--http", "--port", str(port)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        statuses = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=5) as resp:
                    statuses.append(resp.status)
                    break
            except urllib.error.HTTPError as exc:
                statuses.append(exc.code)  # 503 while the model loads
            except OSError:
                pass  # not listening yet
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        assert statuses and statuses[-1] == 200
        body = event_body(app_mention_event(text=f"<@{BOT_USER_ID}> How do I file expenses?"), event_id="EvCli")
        assert post_signed(base + "/slack/events", body, SECRET)[0] == 200
        assert post_signed(base + "/slack/events", body, "wrong")[0] == 401
        update = fake_slack.wait_for("chat.update", 1, timeout=120)[0].params
        assert [el["action_id"] for b in update["blocks"] if b["type"] == "actions" for el in b["elements"]] == [
            "feedback_up", "feedback_down"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)

"""`kbloop serve`: one process with the Slack endpoint, the playground, /healthz and the job runner."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import REPO, small_sample_kb
from tests.fakes.slack_api import BOT_USER_ID, FakeSlackAPI, app_mention_event, event_body, post_signed

SECRET = "serve-test-secret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def test_serve_refuses_public_bind_without_login(kbloop_home, capsys):
    from kbloop.cli import app
    from kbloop.cli.app import run

    assert run(app, ["init"]) == 0
    capsys.readouterr()
    assert run(app, ["serve", "--host", "0.0.0.0"]) == 1
    err = capsys.readouterr().err
    assert "KBLOOP_PLAYGROUND_AUTH" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_serve_answers_slack_serves_playground_and_stops_cleanly(kbloop_home, tmp_path):
    with FakeSlackAPI() as slack:
        env = {**os.environ, "SLACK_BOT_TOKEN": "xoxb-serve", "SLACK_SIGNING_SECRET": SECRET,
               "KBLOOP_SLACK_API_URL": slack.url, "PYTHONPATH": str(REPO)}
        kbloop = [sys.executable, "-m", "kbloop"]
        subprocess.run(kbloop + ["init"], env=env, check=True, capture_output=True, cwd=tmp_path)
        kb = small_sample_kb(tmp_path / "kb")  # the server embeds what it searches: a few documents, not all
        subprocess.run(kbloop + ["kb", "import", str(kb), "--no-embed"], env=env, check=True,
                       capture_output=True, cwd=tmp_path)
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(kbloop + ["serve", "--port", str(port)], env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 300
            status = None
            while time.monotonic() < deadline and status != 200:
                try:
                    status, _ = _get(base + "/healthz")
                except OSError:
                    status = None  # not listening yet
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.3)
            assert status == 200

            body = event_body(app_mention_event(text=f"<@{BOT_USER_ID}> Where is the Berlin office?"),
                              event_id="EvServe1")
            assert post_signed(base + "/slack/events", body, SECRET)[0] == 200
            assert post_signed(base + "/slack/events", body, "not-the-secret")[0] == 401
            answer = slack.wait_for("chat.update", 1, timeout=120)[0].params
            actions = [el["action_id"] for b in answer["blocks"] if b["type"] == "actions" for el in b["elements"]]
            assert actions == ["feedback_up", "feedback_down"]

            status, page = _get(base + "/playground/")
            assert status == 200 and "gradio" in page.lower()
            assert _get(base + "/")[0] == 200  # redirects to the playground
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                out, _ = proc.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise AssertionError("kbloop serve did not stop within 90 s of SIGTERM") from None
        assert proc.returncode == 0, out
        assert "Traceback" not in out

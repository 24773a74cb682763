"""`kbloop demo`, the README's first command, end to end in its own process: the loop on the sample data
(with a budget of a fifth of an epoch instead of tiny's few minutes of training: what is checked is the loop
and the serving, not what the adapters learnt), then the playground and /healthz served until Ctrl+C."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request

import pytest

from finetune.model.tiny import ensure_tiny_base
from finetune.serving.kb_index import embed_missing_passages
from store import open_db
from store.documents import import_documents
from tests.conftest import SAMPLES
from tests.finetune.registry_fixtures import sample_texts

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # trains twice and serves


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_runs_the_loop_then_serves_until_interrupted(kbloop_home, tmp_path):
    ensure_tiny_base(kbloop_home, sample_texts())  # the test run's tiny, copied in: the demo need not build one
    # The sample KB's embeddings likewise: this process has them (or computes them once for every test that
    # embeds the sample KB); the demo imports the same documents, finds them unchanged and embedded, and
    # skips a few minutes of embedding on two cores.
    db = open_db(kbloop_home / "kbloop.db")
    import_documents(db, [SAMPLES / "kb"])
    assert embed_missing_passages(db) > 0
    port = free_port()
    env = dict(os.environ, KBLOOP_HOME=str(kbloop_home), PYTHONUNBUFFERED="1")
    env.pop("KBLOOP_BASE_MODEL", None)  # the demo runs on tiny whatever the environment says
    proc = subprocess.Popen([sys.executable, "-m", "kbloop", "demo", "--epochs", "0.2", "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    serving = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if "kbloop demo is running" in line:
                serving.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert serving.wait(1500), "\n".join(lines[-40:]) or f"exit code {proc.poll()}"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as health:
            assert health.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/playground/", timeout=30) as page:
            assert page.status == 200 and b"gradio" in page.read().lower()
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
        reader.join(timeout=10)
    out = "\n".join(lines)
    assert code == 0, out[-3000:]
    assert re.search(r"Knowledge base and QA pairs imported \(\d{3} new examples", out)
    first = re.search(r"Active adapter: (v\d+)", out)
    assert first, out[-3000:]
    # The loop once: the approved correction is the next answer at once, then a retrain.
    approved = out.split('Asked again, before any retraining:', 1)[1]
    assert "Ask the office team in #berlin-office" in approved.splitlines()[1]
    assert "Approved answer: reviewed by demo-curator" in approved
    # Where the retrain started, and why: with a fifth of an epoch the first adapter reproduces too few of its
    # answers to be continued, and the run starts from the base, saying so (tiny's defaults continue it).
    v = first.group(1)
    assert re.search(rf"Started from: (continuing from {v}|training from the base, not continuing {v} \(active\): "
                     rf"{v} reproduces \d+% of its training answers, too few to continue from)", out), out[-3000:]
    assert "Traceback" not in out

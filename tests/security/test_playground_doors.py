"""Hostile requests against the real playground server on loopback (security review, issue 16).

Each test starts the Gradio app as `kbloop playground` does (launch on 127.0.0.1, a free port) and knocks
on a door that must stay shut: a foreign Host header (DNS rebinding), a foreign Origin (a cross-site form),
admin actions without admin rights, password guessing, and export files left behind.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import httpx
import pytest

from playground import PlaygroundConfig, build_playground, launch
from store import open_db
from store.jobs import list_jobs
from tests.playground.conftest import seed_feedback
from tests.playground.test_app_client import free_port

ALICE = ("alice", "alice-password-1")
BOB = ("bob", "bob-password-22")


@contextlib.contextmanager
def running(db_path: Path, **config):
    """The playground, launched for real on 127.0.0.1; yields (base url, config)."""
    config = PlaygroundConfig(port=free_port(), **config)
    demo = build_playground(config=config, engine=None, db_path=db_path)
    launch(demo, config=config, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{config.port}/", config
    finally:
        demo.close()


def gradio_client(url: str, auth=None):
    from gradio_client import Client

    return Client(url, auth=auth, verbose=False, analytics_enabled=False, download_files=False)


@pytest.fixture
def seeded_db(db_path):
    seed_feedback(open_db(db_path))
    return db_path


# ----------------------------------------------------------------------------------------------- no login

def test_without_login_a_foreign_host_header_is_refused(seeded_db):
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 sends Host: evil.example."""
    with running(seeded_db) as (url, config):
        for host in ("evil.example", f"evil.example:{config.port}", "127.0.0.1.evil.example", "0.0.0.0"):
            r = httpx.get(url + "config", headers={"Host": host})
            assert r.status_code == 400, host
            assert "Host" in r.text and "evil" not in r.text
        call = httpx.post(url + "gradio_api/call/retrain", json={"data": ["", "", 0, False]},
                          headers={"Host": "evil.example"})
        assert call.status_code == 400
        for host in (f"127.0.0.1:{config.port}", f"localhost:{config.port}", "localhost", f"[::1]:{config.port}"):
            assert httpx.get(url + "config", headers={"Host": host}).status_code == 200, host
    assert list_jobs(open_db(seeded_db)) == []


def test_without_login_a_foreign_origin_is_refused(seeded_db):
    """A cross-site request to http://127.0.0.1:PORT carries the attacker's Origin: refused before it acts."""
    with running(seeded_db, local_admin=True) as (url, config):
        for origin in ("http://evil.example", "null", f"http://evil.example:{config.port}"):
            r = httpx.post(url + "gradio_api/call/retrain", json={"data": ["", "", 0, False]},
                           headers={"Origin": origin})
            assert r.status_code == 403, origin
        same = httpx.get(url + "config", headers={"Origin": f"http://localhost:{config.port}"})
        assert same.status_code == 200
    assert list_jobs(open_db(seeded_db)) == []


def test_without_login_the_local_user_is_a_curator_unless_admin_is_opted_in(seeded_db):
    with running(seeded_db) as (url, _):
        local = gradio_client(url)
        assert "**local** (curator)" in local.predict(api_name="/whoami")[0]
        out = local.predict("", "", 0, False, api_name="/retrain")
        assert out[0].startswith("⛔") and "KBLOOP_PLAYGROUND_LOCAL_ADMIN" in out[0]
        assert "⛔" in local.predict(None, api_name="/rollback")[0]
        assert "⛔" in local.predict("v1", False, api_name="/promote")[0]
        assert list_jobs(open_db(seeded_db)) == []
        # Curating stays open to the local user: that is what the loopback playground is for.
        assert "sft records written" in local.predict("sft", api_name="/export")[1]
    with running(seeded_db, local_admin=True) as (url, _):
        local = gradio_client(url)
        assert "**local** (admin)" in local.predict(api_name="/whoami")[0]
        assert local.predict("", "", 0, False, api_name="/retrain")[0].startswith("✅ Job")
    (job,) = list_jobs(open_db(seeded_db))
    assert job.requester == "playground:local"


# ---------------------------------------------------------------------------------------------- with login

def test_with_login_admin_actions_are_refused_to_a_curator(seeded_db):
    with running(seeded_db, auth=(ALICE, BOB), admins=("alice",)) as (url, _):
        bob = gradio_client(url, BOB)
        for api_name, args, refusal in (("/retrain", ("", "", 0, False), "bob may not start retraining"),
                                        ("/cancel_job", (), "bob may not cancel a job"),
                                        ("/promote", ("v1", True), "bob may not promote"),
                                        ("/rollback", (None,), "bob may not roll back")):
            out = bob.predict(*args, api_name=api_name)
            assert out[0].startswith("⛔") and refusal in out[0], api_name
    assert list_jobs(open_db(seeded_db)) == []


def test_repeated_failed_logins_are_slowed_down_per_user_and_address(seeded_db):
    import time

    with running(seeded_db, auth=(ALICE, BOB), admins=("alice",), login_free_failures=3,
                 login_backoff_s=1.0) as (url, _):
        def login(user, password):
            return httpx.post(url + "login", data={"username": user, "password": password})

        assert [login("alice", f"guess-{i}").status_code for i in range(3)] == [400, 400, 400]
        locked = login(*ALICE)  # the right password, but too soon after the guesses
        assert locked.status_code == 429
        assert int(locked.headers["Retry-After"]) >= 1
        assert "alice-password-1" not in locked.text
        assert login(*BOB).status_code == 429  # the guesses came from this address: it waits too
        time.sleep(float(locked.headers["Retry-After"]) + 0.2)
        assert login(*ALICE).status_code == 200
        # After the pause each failure doubles the wait: one more wrong guess locks again at once.
        assert login("alice", "guess-again").status_code == 400
        assert login(*ALICE).status_code == 429


# ------------------------------------------------------------------------------------------------- exports

def test_exports_do_not_pile_up_in_temporary_folders(seeded_db, tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio-cache"))
    with running(seeded_db, export_keep=2) as (url, _):
        local = gradio_client(url)
        for _ in range(6):
            path, message = local.predict("sft", api_name="/export")
            assert "sft records written" in message
        left = sorted(p for p in scratch.rglob("*.jsonl"))
        assert len(left) <= 2, left
    # The playground's own export folder goes with it.
    assert sorted(scratch.rglob("*.jsonl")) == []

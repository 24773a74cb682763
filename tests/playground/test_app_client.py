"""The running app, driven over HTTP with gradio_client: login, review decisions, admin checks server-side."""

from __future__ import annotations

import socket

import pytest

from playground import PlaygroundConfig, build_playground, launch
from store import open_db
from store.examples import list_examples
from store.jobs import list_jobs
from tests.playground.conftest import seed_feedback

FILTERS = ("all", "to_review", "", "", "", "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    db_path = tmp_path_factory.mktemp("playground") / "kbloop.db"
    ids = seed_feedback(open_db(db_path))
    config = PlaygroundConfig(port=free_port(), auth=(("alice", "alice-password"), ("bob", "bob-password-1")), admins=("alice",),
                              export_dir=str(tmp_path_factory.mktemp("exports")))
    demo = build_playground(config=config, engine=None, db_path=db_path)
    launch(demo, config=config, prevent_thread_lock=True, quiet=True)
    yield {"url": f"http://127.0.0.1:{config.port}/", "db_path": db_path, "ids": ids}
    demo.close()


def client(server, user: str, password: str):
    from gradio_client import Client

    return Client(server["url"], auth=(user, password), verbose=False, analytics_enabled=False,
                  download_files=False)


def test_login_is_required(server):
    import httpx

    assert httpx.get(server["url"] + "config").status_code == 401
    with pytest.raises(Exception):  # noqa: B017 - gradio_client's login error class differs by version
        client(server, "alice", "wrong")


def test_curator_approves_with_an_edit_and_is_recorded(server):
    alice = client(server, "alice", "alice-password")
    assert alice.predict(api_name="/whoami")[0].startswith("Signed in as **alice** (admin)")
    key = f"i:{server['ids']['badge']}"
    opened = alice.predict(key, api_name="/open_item")
    assert opened[0] == key and "unreviewed" in opened[1]
    # Unchanged 👎 answer: refused, nothing stored.
    refused = alice.predict(key, "", "Buy a new one.", False, *FILTERS, api_name="/approve")
    assert refused[0].startswith("⛔")
    result = alice.predict(key, "", "Report it at reception; they block the old badge.", False, *FILTERS,
                           api_name="/approve")
    assert result[0].startswith("✅ Approved") and "with your edit" in result[0]
    db = open_db(server["db_path"])
    (ex,) = [e for e in list_examples(db, status="approved") if e.interaction_id == server["ids"]["badge"]]
    assert ex.reviewer == "alice" and ex.answer.startswith("Report it at reception")
    table = alice.predict("reception", "approved", api_name="/dataset")
    assert "Report it at reception" in str(table)


def test_admin_controls_are_checked_on_the_server(server):
    bob = client(server, "bob", "bob-password-1")
    assert "(curator)" in bob.predict(api_name="/whoami")[0]
    out = bob.predict("", "", None, False, "kto", api_name="/retrain")
    assert out[0].startswith("⛔") and "bob may not start retraining" in out[0]
    assert "bob may not roll back" in bob.predict(None, api_name="/rollback")[0]
    assert list_jobs(open_db(server["db_path"])) == []
    alice = client(server, "alice", "alice-password")
    out = alice.predict("", "", None, False, "kto", api_name="/retrain")
    assert out[0].startswith("✅ Job")
    (job,) = list_jobs(open_db(server["db_path"]))
    assert job.requester == "playground:alice" and job.params == {"train": {"objective": "kto"}}


def test_export_and_redact_endpoints(server):
    bob = client(server, "bob", "bob-password-1")
    path, message = bob.predict("sft", api_name="/export")
    assert "sft records written" in message
    text, note = bob.predict("mail me: jane@example.com", api_name="/redact")
    assert text == "mail me: [redacted e-mail address]" and "e-mail address" in note
    reject = bob.predict(f"i:{server['ids']['leave']}", *FILTERS, api_name="/reject")
    assert reject[0].startswith("✅ Rejected")
    db = open_db(server["db_path"])
    from store.review import review_item

    assert review_item(db, server["ids"]["leave"])["reviewer"] == "bob"


@pytest.mark.slow  # embeds a small knowledge base
def test_search_shows_the_passages_and_their_evidence_or_why_nothing(server, tmp_path):
    from store.documents import import_documents
    from tests.conftest import SAMPLES

    kb = tmp_path / "kb"
    (kb / "zh").mkdir(parents=True)
    for name in ("vpn-laptop-setup.md", "zh/annual-leave.md"):
        (kb / name).write_text((SAMPLES / "kb" / name).read_text(encoding="utf-8"), encoding="utf-8")
    import_documents(open_db(server["db_path"]), [kb])
    bob = client(server, "bob", "bob-password-1")  # a curator: searching needs no admin

    table, summary = bob.predict("How do I set up the VPN on my laptop?", api_name="/search")
    rows = table["data"]
    assert rows[0][2].startswith("vpn-laptop-setup.md #") and rows[0][4] == "yes"
    assert [row[0] for row in rows] == list(range(1, len(rows) + 1)) and "best first" in summary
    table, summary = bob.predict("年假有多少天？", api_name="/search")
    assert table["data"][0][2].startswith("zh/annual-leave.md #")
    table, summary = bob.predict("What is the capital of Australia?", api_name="/search")
    assert table["data"] in ([], [[""] * len(table["headers"])]) and "does not cover this question" in summary

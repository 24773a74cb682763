"""Shared fixtures. Every test runs with KBLOOP_HOME in a temporary folder: no test touches a user's data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"

# No test may reach a model hub: everything runs on the locally built `tiny` base and shipped data.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def kbloop_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "kbloop-home"
    monkeypatch.setenv("KBLOOP_HOME", str(home))
    monkeypatch.delenv("KBLOOP_DB", raising=False)
    monkeypatch.setenv("KBLOOP_BASE_MODEL", "tiny")
    for var in ("KBLOOP_ADMINS", "KBLOOP_NOTIFY_CHANNEL", "KBLOOP_PLAYGROUND_AUTH", "KBLOOP_PLAYGROUND_ADMINS",
                "KBLOOP_PLAYGROUND_LOCAL_ADMIN", "SLACK_BOT_TOKEN", "SLACK_SIGNING_SECRET", "SLACK_APP_TOKEN",
                "KBLOOP_SLACK_API_URL"):
        monkeypatch.delenv(var, raising=False)
    # A .env in the developer's working directory must not leak into tests.
    monkeypatch.chdir(tmp_path)
    return home


@pytest.fixture
def db_path(kbloop_home) -> Path:
    return kbloop_home / "kbloop.db"


@pytest.fixture
def db(db_path):
    from store import open_db

    return open_db(db_path)

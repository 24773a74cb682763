"""Shared fixtures. Every test runs with KBLOOP_HOME in a temporary folder: no test touches a user's data.

REPO and SAMPLES (the shipped sample data) are defined here, once; tests import them from here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"

# No test may reach a model hub: everything runs on the locally built `tiny` base and shipped data.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# finetune sets OMP_WAIT_POLICY=passive before torch loads (finetune/__init__.py): import it before any test
# module imports torch, so that the suite's engines, job children and servers sharing two cores do not spin.
import finetune  # noqa: E402, F401


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


@pytest.fixture(scope="session", autouse=True)
def tiny_built_once(tmp_path_factory):
    """Each `tiny` base is built once per test run and copied into every workspace that asks for one.

    finetune.model.tiny.ensure_tiny_base builds the base from the workspace's knowledge-base text (seeded random
    weights, a tokenizer trained on the text): the same text always gives the same base, so a workspace gets
    a copy of the one already built for its text instead of building its own. Processes a test starts (job
    children, servers) use the copy when the workspace has one, and build their own otherwise.
    """
    import finetune.model.tiny as tiny

    build = tiny.ensure_tiny_base
    cache = tmp_path_factory.mktemp("tiny-bases")

    def ensure_from_cache(home: Path, texts, *, spec: tiny.TinySpec | None = None) -> Path:
        spec = spec or tiny.TinySpec()
        target = Path(home) / "models" / "tiny"
        if (target / "config.json").exists():
            return target
        texts = list(texts)
        key = hashlib.sha256(json.dumps([asdict(spec), texts]).encode("utf-8")).hexdigest()[:16]
        built = build(cache / key, texts, spec=spec)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
        try:
            shutil.copytree(built, staging / "model")
            try:
                os.rename(staging / "model", target)
            except OSError:  # another thread or process put one there first: as good as ours
                if not (target / "config.json").exists():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    patch = pytest.MonkeyPatch()
    patch.setattr(tiny, "ensure_tiny_base", ensure_from_cache)
    yield
    patch.undo()


def small_sample_kb(folder: Path, names=("vpn-laptop-setup.md", "expenses.md", "berlin-office.md",
                                          "zh/annual-leave.md")) -> Path:
    """A few of the sample KB's documents copied into `folder`: a process that embeds them (a server started by a
    test) spends seconds, not the minutes the whole sample KB takes it."""
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SAMPLES / "kb" / name, folder / name)
    return folder


@pytest.fixture
def db_path(kbloop_home) -> Path:
    return kbloop_home / "kbloop.db"


@pytest.fixture
def db(db_path):
    from store import open_db

    return open_db(db_path)

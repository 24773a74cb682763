"""Opening the database: pragmas, migrations, version guard, transactions, online backup.

Every process (and every thread) opens its own connection with `open_db`; SQLite's WAL mode lets
readers run beside one writer, and the busy timeout makes writers wait their turn instead of failing.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import sqlite_utils

from store.errors import StoreError
from store.files import atomic_path
from store.migrations import MIGRATIONS

BUSY_TIMEOUT_S = 60.0


class NewerDatabaseError(StoreError):
    pass


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
    # NORMAL is durable across application crashes in WAL mode; only a power loss can lose the last commit.
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def check_not_newer(db: sqlite_utils.Database, path: Path | str = "") -> None:
    """Refuse a database that a newer kbloop migrated: its schema may not be what this code expects."""
    known = {m.name for m in MIGRATIONS._migrations}
    unknown = [m.name for m in MIGRATIONS.applied(db) if m.name not in known]
    if unknown:
        raise NewerDatabaseError(
            f"{path}: this database was written by a newer kbloop (unknown migrations: {', '.join(unknown)}); "
            "upgrade kbloop or use a backup. The database was not changed."
        )


def open_db(path: Path | str, *, migrate: bool = True, create: bool = True) -> sqlite_utils.Database:
    """Open the store at `path`, applying pending migrations (each in its own transaction)."""
    path = Path(path)
    if not path.exists():
        if not create:
            raise StoreError(f"{path}: no database here; run `kbloop init` first")
        path.parent.mkdir(parents=True, exist_ok=True)
    elif path.is_dir():
        raise StoreError(f"{path}: is a folder, expected a database file")
    try:
        db = sqlite_utils.Database(_connect(path))
        check_not_newer(db, path)
        if migrate and MIGRATIONS.pending(db):
            # One IMMEDIATE transaction around all pending migrations: concurrent first opens queue
            # behind each other (the second finds nothing pending), and a failing migration rolls
            # back every step of this upgrade, leaving the database as it was.
            with write_transaction(db):
                MIGRATIONS.apply(db)
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path}: not a usable SQLite database ({exc})") from None
    return db


_local = threading.local()


def local_db(path: Path | str) -> sqlite_utils.Database:
    """A connection for the calling thread, opened once and reused (sqlite3 connections are per thread)."""
    cache: dict[str, sqlite_utils.Database] = getattr(_local, "dbs", None) or {}
    _local.dbs = cache
    key = str(Path(path).resolve())
    if key not in cache:
        cache[key] = open_db(path)
    return cache[key]


@contextlib.contextmanager
def write_transaction(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """BEGIN IMMEDIATE … COMMIT: take the write lock up front.

    A deferred transaction that reads and then writes can fail at once with "database is locked" when
    another writer committed in between (the busy handler cannot help a lock upgrade); IMMEDIATE waits
    in the busy handler instead. Writers of one process queue on a lock per database file first: the
    busy handler sleeps in growing steps (up to 100 ms) before it retries, which put hundreds of
    milliseconds into a Slack acknowledgement waiting behind the answer being recorded, while a thread
    waiting on a lock runs the moment the lock is free. Other processes still meet in the busy handler.
    """
    conn = db.conn
    if conn.in_transaction:  # nested: the outer transaction already holds the lock
        with db.atomic():
            yield db
        return
    with _writer_lock(conn):
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")


_writer_locks: dict[str, threading.RLock] = {}
_writer_locks_guard = threading.Lock()


def _writer_lock(conn: sqlite3.Connection) -> threading.RLock:
    """The lock of the database file `conn` writes to; re-entrant, so that a thread writing through a second
    connection to the same file meets SQLite's busy timeout (an error) rather than waiting on itself forever."""
    path = conn.execute("PRAGMA database_list").fetchone()[2]
    with _writer_locks_guard:
        return _writer_locks.setdefault(path, threading.RLock())


def backup_db(db: sqlite_utils.Database, out: Path | str) -> Path:
    """A consistent copy through SQLite's online backup API, safe while other processes write."""
    out = Path(out)
    if out.exists():
        raise StoreError(f"{out}: already exists; choose a new file name")
    with atomic_path(out) as tmp:
        dest = sqlite3.connect(str(tmp))
        try:
            db.conn.backup(dest)
            dest.execute("PRAGMA journal_mode=DELETE")  # a single self-contained file
        finally:
            dest.close()
    return out


def schema_version(db: sqlite_utils.Database) -> list[str]:
    return [m.name for m in MIGRATIONS.applied(db)]


def ping(db: sqlite_utils.Database) -> None:
    """Raise if the database cannot answer a query (health checks)."""
    db.execute("SELECT COUNT(*) FROM _sqlite_migrations").fetchone()


def database_file(db: sqlite_utils.Database) -> str:
    """The file behind a connection (a per-connection key for in-memory databases): cache keys."""
    for _seq, name, file in db.execute("PRAGMA database_list").fetchall():
        if name == "main" and file:
            return file
    return f"memory:{id(db.conn)}"

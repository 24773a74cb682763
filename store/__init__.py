"""kbloop's system of record: SQLite through sqlite-utils. No SQL lives outside this package.

Open a connection per process or thread with `open_db(path)` (migrations applied on open); every
read and write is a typed function in the module named for its table group.
"""

from store.db import NewerDatabaseError, backup_db, local_db, open_db, write_transaction
from store.errors import ConfigError, KbloopError, StoreError

__all__ = ["open_db", "local_db", "backup_db", "write_transaction", "KbloopError", "StoreError", "ConfigError",
           "NewerDatabaseError"]

"""Whether a process is still alive: used to tell an abandoned job or temp folder from one in use."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True while `pid` runs on this machine (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # no /proc (macOS): kill(0) is all we know
        return True

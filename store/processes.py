"""Whether a process is still alive, and when it started: how a job whose worker died (finetune.jobs.worker_ids)
or a temporary adapter folder whose writer died (finetune.registry.folders) is told from one in use."""

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


def process_start_ticks(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot (Linux /proc); None where that cannot be known.

    A pid alone does not name a process for long: the kernel reuses it. A pid together with its start time
    does, so a job's owner recorded as both can be told apart from a later process that got its pid.
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            # Fields after the command name (which may hold spaces and parentheses): state is field 3,
            # starttime field 22.
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None

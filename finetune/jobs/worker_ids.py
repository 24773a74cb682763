"""A worker's id and whether the worker it names still runs.

An id is `host:pid@start:token`: the host, the process (its pid and start time, so that a later process given the
same pid is not mistaken for it) and a random token. A job's row records its owner's id (store.jobs), and the next
worker on the same host asks the process instead of trusting a late heartbeat.
"""

from __future__ import annotations

import os
import socket
import uuid

from store.processes import pid_alive, process_start_ticks


def default_worker_id() -> str:
    """`host:pid@start:token`: the host and process (pid and start time, so that a later process given the
    same pid is not mistaken for this one) a job's owner can be checked against; `host:pid:token` where
    the start time cannot be read."""
    pid = os.getpid()
    ticks = process_start_ticks(pid)
    return f"{socket.gethostname()}:{pid}{'' if ticks is None else f'@{ticks}'}:{uuid.uuid4().hex[:6]}"


def owner_alive_here(worker_id: str | None, *, host: str | None = None) -> bool | None:
    """Whether the worker named `worker_id` still runs: True or False when it is on this host (its pid, and
    its start time where the id records one), None when that cannot be known (another host, a custom id)."""
    w_host, _, rest = (worker_id or "").partition(":")
    pid_s, at, ticks_s = rest.partition(":")[0].partition("@")
    if w_host != (host or socket.gethostname()) or not pid_s.isdigit():
        return None
    pid = int(pid_s)
    if not pid_alive(pid):
        return False
    if at and ticks_s.isdigit():
        started = process_start_ticks(pid)
        if started is not None and started != int(ticks_s):
            return False  # the pid now belongs to a process that started later: the worker is gone
    return True

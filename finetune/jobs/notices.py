"""Telling people about jobs: what a notifier is told (`JobNotifier`, implemented by bot.SlackJobNotifier) and
`NoticeSender`, which calls it from a thread of its own so that a slow or hung Slack never delays the worker's
heartbeat.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Protocol

from store.jobs import Job

log = logging.getLogger("kbloop.jobs")


class JobNotifier(Protocol):
    """Told about a job's life; implemented by bot.SlackJobNotifier (thread or DM of the requester)."""

    def job_started(self, job: Job) -> None: ...

    def job_progress(self, job: Job, progress: dict) -> None:
        """`progress`: a finetune.jobs.protocol.JobProgress as stored (`JobProgress.to_dict()`)."""
        ...

    def job_finished(self, job: Job, outcome: dict) -> None:
        """`outcome`: a finetune.jobs.protocol.JobOutcome as JSON (`JobOutcome.to_dict()`): status
        (succeeded|failed|cancelled), outcome (promoted|candidate|unchanged|failed|cancelled), version,
        promoted, reasons (list of str), table (the metric table as text), message (one line for people),
        metrics, active_version, dataset_hash, n_examples, error."""
        ...


class NoticeSender:
    """Calls a JobNotifier from a thread of its own, in the order the notices were queued.

    At most `max_pending` notices wait. A newer progress notice replaces a waiting one of the same job
    (it says more); when the queue is full a waiting progress notice gives way, and failing that the new
    notice is dropped with a warning: a notice is never worth blocking the worker for.
    """

    IDLE_EXIT_S = 5.0  # the thread ends after this long with nothing to send; the next notice starts another

    def __init__(self, notifier: JobNotifier, *, max_pending: int):
        self._notifier = notifier
        self._max = max_pending
        self._pending: deque[tuple[str, Job, tuple]] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._thread: threading.Thread | None = None

    def send(self, method: str, job: Job, *args) -> None:
        with self._cond:
            if method == "job_progress":
                for i, (m, j, _) in enumerate(self._pending):
                    if m == "job_progress" and j.id == job.id:
                        self._pending[i] = (method, job, args)
                        return
            if len(self._pending) >= self._max:
                progress = next((n for n in self._pending if n[0] == "job_progress"), None)
                if progress is not None:
                    self._pending.remove(progress)
                elif method == "job_progress":
                    log.warning("job %s: progress notice dropped: %d notices wait for the notifier", job.id,
                                len(self._pending))
                    return
                else:
                    m, j, _ = self._pending.popleft()
                    log.warning("job %s: %s notice dropped: %d notices wait for the notifier", j.id, m, self._max)
            self._pending.append((method, job, args))
            if self._thread is None:
                self._thread = threading.Thread(target=self._deliver, name="kbloop-job-notices", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return len(self._pending) + (1 if self._busy else 0)

    def flush(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._busy, timeout)

    def _deliver(self) -> None:
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: self._pending, self.IDLE_EXIT_S):
                    self._thread = None
                    return
                method, job, args = self._pending.popleft()
                self._busy = True
            try:
                getattr(self._notifier, method)(job, *args)
            except Exception:  # Slack being down must not fail the job
                log.exception("notifier %s failed for job %s", method, job.id)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

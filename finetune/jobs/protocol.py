"""What a worker and its training child say to each other: typed messages with a JSON round trip.

Both sides import this module and nothing of each other (finetune.jobs.worker is the worker, finetune.jobs.child the
child). Three messages, each a dataclass whose `to_dict()` is the JSON that is stored or written:

- `JobProgress`: the child's progress, in the store's `jobs.progress` (phase, detail, step, total, loss,
  epoch, eta_s, updated_at, dataset_hash, n_examples); `total` is the number of optimizer steps.
- `ChildResult`: what the child leaves in `$KBLOOP_HOME/jobs/<id>/outcome.json` (`job_dir`) for the worker.
- `JobOutcome`: what the worker concludes, in the store's `jobs.result` (less `error`, which has its own
  column) and what notifiers (finetune.jobs.notices.JobNotifier) are told.

One vocabulary of statuses, the store's job statuses: a finished job, and the child that ran it,
`succeeded`, `failed` or `cancelled`. What became of a retraining (`JobOutcome.outcome`) is one of
`promoted`, `candidate`, `unchanged`, `failed`, `cancelled`, or `done` for other job kinds.

Keys a message does not know are kept in `extra` (a job kind's runner may report its own, e.g. a
test's `steps`), so a round trip never drops anything.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from store.files import write_text_atomic

# Final statuses, the same words as the store's `jobs.status`.
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
FINAL_STATUSES = (SUCCEEDED, FAILED, CANCELLED)

# What became of the job (`JobOutcome.outcome`).
PROMOTED, CANDIDATE, UNCHANGED, DONE = "promoted", "candidate", "unchanged", "done"

# The child's exit status: 0 done, 1 failed, 2 the job is not this worker's (any more), 3 cancelled.
EXIT_OK, EXIT_FAILED, EXIT_NOT_OURS, EXIT_CANCELLED = 0, 1, 2, 3

OUTCOME_FILE = "outcome.json"


def job_dir(home: Path, job_id: int) -> Path:
    """`$KBLOOP_HOME/jobs/<id>/`: the child's log (`child.log`) and its result (`outcome.json`)."""
    return Path(home) / "jobs" / str(job_id)


class _Message:
    """The JSON round trip shared by the three messages: known fields, then `extra` at the top level."""

    extra: dict

    def to_dict(self) -> dict[str, Any]:
        known = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **known}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in names},
                   extra={k: v for k, v in data.items() if k not in names})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=2, default=str)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class JobProgress(_Message):
    """The child's progress report (written by finetune.jobs.child.ProgressReporter, read by the worker,
    the playground, the CLI and Slack notices). Fields left None are not written."""

    phase: str = "starting"  # starting, preparing, training, evaluating, saving, …
    detail: str | None = None  # the phase in words ("evaluating v3")
    step: int | None = None
    total: int | None = None  # optimizer steps of the whole run
    loss: float | None = None
    epoch: float | None = None
    eta_s: float | None = None  # seconds left, as of `updated_at`
    updated_at: str | None = None  # ISO time of the report
    dataset_hash: str | None = None
    n_examples: int | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().to_dict().items() if v is not None}


@dataclass(frozen=True)
class ChildResult(_Message):
    """What the training child reports (`outcome.json`); rank 0 alone writes it."""

    status: str  # succeeded | failed | cancelled
    version: str | None = None  # the candidate registered
    passed: bool | None = None  # whether the candidate passed the promotion gate
    reasons: list[str] = field(default_factory=list)
    table: str = ""  # the metric table as text
    metrics: dict = field(default_factory=dict)
    active_version: str | None = None  # the adapter it was compared with
    dataset_hash: str | None = None
    n_examples: int | None = None
    start: str | None = None  # continued from the active adapter, or why not
    error: str | None = None
    elapsed_s: float | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in FINAL_STATUSES:
            raise ValueError(f"child status must be one of {', '.join(FINAL_STATUSES)}, not {self.status!r}")


@dataclass(frozen=True)
class JobOutcome(_Message):
    """What the worker concludes about a job: stored as `jobs.result`, told to notifiers."""

    status: str = FAILED  # succeeded | failed | cancelled
    outcome: str = FAILED  # promoted | candidate | unchanged | failed | cancelled | done
    version: str | None = None
    promoted: bool = False
    reasons: list[str] = field(default_factory=list)
    table: str = ""
    message: str = ""  # one line for people
    metrics: dict = field(default_factory=dict)
    active_version: str | None = None
    dataset_hash: str | None = None
    n_examples: int | None = None
    error: str | None = None
    start: str | None = None
    passed: bool | None = None
    elapsed_s: float | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in FINAL_STATUSES:
            raise ValueError(f"job status must be one of {', '.join(FINAL_STATUSES)}, not {self.status!r}")

    @classmethod
    def failed(cls, reason: str) -> JobOutcome:
        return cls(status=FAILED, outcome=FAILED, reasons=[reason], message=f"failed: {reason}", error=reason)

    @classmethod
    def from_child(cls, child: ChildResult, **changes) -> JobOutcome:
        """The child's report carried over (everything but its status), with `changes` applied."""
        carried = {k: v for k, v in child.to_dict().items() if k != "status"}
        return dataclasses.replace(cls.from_dict(carried), **changes)

    def replace(self, **changes) -> JobOutcome:
        return dataclasses.replace(self, **changes)


def write_child_result(home: Path, job_id: int, result: ChildResult) -> Path:
    """Leave the child's result where the worker reads it; written whole or not at all."""
    path = job_dir(home, job_id) / OUTCOME_FILE
    write_text_atomic(path, result.to_json())
    return path


def read_child_result(home_or_dir: Path, job_id: int | None = None) -> ChildResult | None:
    """The child's result, or None when it left none (it crashed, was killed, or wrote something unreadable)."""
    folder = job_dir(home_or_dir, job_id) if job_id is not None else Path(home_or_dir)
    try:
        return ChildResult.from_json((folder / OUTCOME_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return None


__all__ = [
    "SUCCEEDED", "FAILED", "CANCELLED", "FINAL_STATUSES", "PROMOTED", "CANDIDATE", "UNCHANGED", "DONE",
    "EXIT_OK", "EXIT_FAILED", "EXIT_NOT_OURS", "EXIT_CANCELLED", "OUTCOME_FILE", "job_dir", "JobProgress",
    "ChildResult", "JobOutcome", "write_child_result", "read_child_result",
]

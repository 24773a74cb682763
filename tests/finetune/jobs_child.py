"""A job child for the worker's mechanics tests: the real finetune.jobs.child entry point (death signal, SIGTERM,
ownership checks, progress and outcome files) around a scripted job body instead of training.

    python -m tests.finetune.jobs_child JOB_ID --db … (the worker adds the arguments)

Job params (kind "scripted"): steps, step_s, fail ("error" | "config" | "kill"), ignore_term, marker (a file to which
the job appends "<job id> <pid>" when it starts and "done <job id>" when it finishes).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from types import SimpleNamespace

from finetune.jobs import child as jobrun
from finetune.jobs.protocol import SUCCEEDED, ChildResult


def run_scripted(db, job, *, home, base, reporter, should_stop) -> ChildResult:
    p = job.params
    if p.get("ignore_term"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if p.get("marker"):
        with open(p["marker"], "a", encoding="utf-8") as f:
            f.write(f"{job.id} {os.getpid()}\n")
    steps, step_s = int(p.get("steps", 3)), float(p.get("step_s", 0.05))
    for step in range(1, steps + 1):
        if not p.get("ignore_term"):
            should_stop.check()
        time.sleep(step_s)
        reporter.step(SimpleNamespace(step=step, total_steps=steps, epoch=step / steps, loss=1.0 / step,
                                      learning_rate=1e-3, eta_s=(steps - step) * step_s))
        if p.get("fail") == "error" and step == steps // 2 + 1:
            raise RuntimeError("scripted failure")
        if p.get("fail") == "config" and step == steps // 2 + 1:
            from store import ConfigError

            raise ConfigError("the scripted setting cannot work")
        if p.get("fail") == "kill" and step == steps // 2 + 1:
            os.kill(os.getpid(), signal.SIGKILL)
    if p.get("marker"):
        with open(p["marker"], "a", encoding="utf-8") as f:
            f.write(f"done {job.id}\n")
    return ChildResult(status=SUCCEEDED, extra={"steps": steps})


if __name__ == "__main__":
    sys.exit(jobrun.main(runners={"scripted": run_scripted}))

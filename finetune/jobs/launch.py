"""Launching a job's child process and reading how it ended: the command (`python -m finetune.jobs.child`, or the
same under `accelerate launch` / `torchrun` with N processes), signals to its process group, and the reason a
failed child gives.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from finetune.jobs.protocol import ChildResult

LAUNCHERS = ("python", "accelerate", "torchrun")


def child_command(job_id: int, *, db_path: Path, home: Path, config) -> list[str]:
    """The command that runs job `job_id` as `config` (a WorkerConfig) says."""
    args = [str(job_id), "--db", str(db_path), "--home", str(home),
            "--base", config.base_model, "--worker-id", config.worker_id]
    if config.child_command:
        return [*config.child_command, *args]
    if config.launcher == "python":
        return [sys.executable, "-m", "finetune.jobs.child", *args]
    # Launchers start behind `finetune.jobs.child --exec`, which gives them the death signal before exec'ing them.
    wrap = [sys.executable, "-m", "finetune.jobs.child", "--exec"]
    if config.launcher == "torchrun":
        return [*wrap, sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={config.nproc}", "-m", "finetune.jobs.child", *args]
    # accelerate: `--cpu` lets the same command run N processes on gloo where there is no GPU.
    launch = [sys.executable, "-m", "accelerate.commands.launch", f"--num_processes={config.nproc}",
              "--num_machines=1"]
    if not has_gpu():
        launch.append("--cpu")
    elif config.nproc > 1:
        launch.append("--multi_gpu")
    return [*wrap, *launch, "-m", "finetune.jobs.child", *args]


def child_failure(rc: int, child: ChildResult | None, workdir: Path) -> str:
    if child is not None and child.error:
        return child.error
    if rc < 0:
        name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
        hint = " (out of memory?)" if -rc == signal.SIGKILL else ""
        return f"the training process was killed by {name}{hint}; see {workdir / 'child.log'}"
    tail = _log_tail(workdir / "child.log")
    return f"the training process exited with status {rc}" + (f": {tail}" if tail else "") + \
        f"; see {workdir / 'child.log'}"


def _log_tail(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    # The child leads its own process group: launchers' rank processes get the signal too.
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False

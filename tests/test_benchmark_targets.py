"""docs/benchmarks.md's targets table is the one bench/targets.py generates from the kept bench outputs."""

import subprocess
import sys

from tests.conftest import REPO


def test_the_targets_table_says_what_the_kept_bench_outputs_say():
    done = subprocess.run([sys.executable, str(REPO / "bench" / "targets.py"), "--check"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr

"""`kbloop …`: the command root. Each group of commands lives in its own module.

User errors end with one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import sys

# Importing a module registers its commands on `app`.
from kbloop.cli import adapters, ask, bot, data, playground, runtime, teams, training, worker  # noqa: F401
from kbloop.cli.app import app, run


def main() -> None:
    sys.exit(run(app))


__all__ = ["app", "main"]

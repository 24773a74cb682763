"""What every playground tab is built with: the settings, the calling thread's database, and the caller.

Each event handler resolves the caller (gr.Request.username, or "local" without a login) and opens the calling
thread's own database connection through the one TabContext the app builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from playground.auth import Viewer, viewer_from_request
from playground.config import PlaygroundConfig
from store import local_db


@dataclass(frozen=True)
class TabContext:
    config: PlaygroundConfig
    db_path: Path

    def db(self) -> sqlite_utils.Database:
        return local_db(self.db_path)

    def who(self, request) -> Viewer:
        """The caller of a Gradio event (`request` is its gr.Request)."""
        return viewer_from_request(request, self.config)

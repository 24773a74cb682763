"""Commands: ask."""

from kbloop.cli.app import app  # noqa: F401

"""Commands: serve,demo."""

from kbloop.cli.app import app  # noqa: F401

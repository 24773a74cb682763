"""Commands: train,recommend,sweep."""

from kbloop.cli.app import app  # noqa: F401

"""Commands: playground."""

from kbloop.cli.app import app  # noqa: F401

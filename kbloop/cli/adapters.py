"""Commands: eval,adapters,promote,rollback,export."""

from kbloop.cli.app import app  # noqa: F401

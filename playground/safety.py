"""Secrets and personal data: the scanner lives in `store.sensitive`, where every path into training data and the
knowledge base (the store, the command line, the playground, training start) reads it. Re-exported here for the
playground's handlers."""

from __future__ import annotations

from store.sensitive import Finding, describe, find_sensitive, find_sensitive_in, redact

__all__ = ["Finding", "describe", "find_sensitive", "find_sensitive_in", "redact"]

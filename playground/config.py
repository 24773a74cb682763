"""The playground's one config object, and the rule that keeps it off the network without a login."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


class PlaygroundError(Exception):
    """A setting or request the playground refuses; the message is one line that says what to do."""


@dataclass(frozen=True, kw_only=True)
class PlaygroundConfig:
    host: str = "127.0.0.1"
    port: int = 7860
    # user:password pairs (KBLOOP_PLAYGROUND_AUTH); empty = no login, loopback only.
    auth: tuple[tuple[str, str], ...] = ()
    # users who may train, promote, roll back (KBLOOP_PLAYGROUND_ADMINS).
    admins: tuple[str, ...] = ()
    title: str = "kbloop playground"
    queue_page_size: int = 200
    poll_interval_s: float = 2.0
    # where export files are written for download (None: a temporary folder).
    export_dir: str | None = None
    base_model: str = ""

    @classmethod
    def from_settings(cls, settings, *, host: str | None = None, port: int | None = None) -> "PlaygroundConfig":
        return cls(
            host=host or "127.0.0.1", port=port or 7860,
            auth=tuple(tuple(p) for p in settings.playground_auth),  # type: ignore[misc]
            admins=tuple(settings.playground_admins), base_model=settings.base_model,
        )

    @property
    def login_required(self) -> bool:
        return bool(self.auth)


def is_loopback(host: str) -> bool:
    if host.strip().lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def check_bind(config: PlaygroundConfig, host: str | None = None) -> None:
    """Refuse to listen beyond loopback without a login: the playground edits training data."""
    host = host if host is not None else config.host
    if not config.login_required and not is_loopback(host):
        raise PlaygroundError(
            f"refusing to serve the playground on {host} without a login: set KBLOOP_PLAYGROUND_AUTH=user:password "
            "(comma-separated pairs) or listen on 127.0.0.1"
        )

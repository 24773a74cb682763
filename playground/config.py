"""The playground's one config object, and the rules that keep it off the network without a login."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from kbloop.settings import check_playground_password
from store.errors import KbloopError


class PlaygroundError(KbloopError):
    """A setting or request the playground refuses; the message is one line that says what to do."""


@dataclass(frozen=True, kw_only=True)
class PlaygroundConfig:
    host: str = "127.0.0.1"
    port: int = 7860
    # user:password pairs (KBLOOP_PLAYGROUND_AUTH); empty = no login, loopback only.
    auth: tuple[tuple[str, str], ...] = ()
    # users who may train, promote, roll back (KBLOOP_PLAYGROUND_ADMINS).
    admins: tuple[str, ...] = ()
    # without a login, whether the local user is an admin (KBLOOP_PLAYGROUND_LOCAL_ADMIN).
    local_admin: bool = False
    title: str = "kbloop playground"
    queue_page_size: int = 200
    poll_interval_s: float = 2.0
    # where export files are written for download (None: a temporary folder of the app's own, removed
    # when the server stops); the newest `export_keep` exports are kept, older ones are removed.
    export_dir: str | None = None
    export_keep: int = 8
    base_model: str = ""
    # Failed sign-ins: `login_free_failures` in a row (per user, and per address) cost nothing; each one
    # after that locks further attempts for `login_backoff_s`, doubling, up to `login_backoff_max_s`.
    login_free_failures: int = 5
    login_backoff_s: float = 1.0
    login_backoff_max_s: float = 300.0

    def __post_init__(self) -> None:
        for user, password in self.auth:
            try:
                check_playground_password(user, password)
            except ValueError as exc:
                raise PlaygroundError(f"KBLOOP_PLAYGROUND_AUTH: {exc}") from None
        if self.export_keep < 1:
            raise PlaygroundError(f"export_keep must be at least 1, not {self.export_keep}")

    @classmethod
    def from_settings(cls, settings, *, host: str | None = None, port: int | None = None) -> "PlaygroundConfig":
        return cls(
            host=host or "127.0.0.1", port=port or 7860,
            auth=tuple(tuple(p) for p in settings.playground_auth),  # type: ignore[misc]
            admins=tuple(settings.playground_admins), local_admin=settings.playground_local_admin,
            base_model=settings.base_model,
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


def is_loopback_host_header(value: str | None) -> bool:
    """Whether an HTTP Host header (`name[:port]`, `[v6]:port`) names this machine's loopback interface.

    Only the names themselves count: a DNS-rebinding page sends its own name (evil.example), whatever
    address that name resolves to by then."""
    if not value:
        return False
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return False
    else:
        name, colon, port = value.partition(":")
        if colon and not port.isdigit():
            return False
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_loopback_origin(value: str) -> bool:
    """Whether an Origin header (`scheme://host[:port]`) is a page served from loopback; "null" is not."""
    try:
        parts = urlsplit(value.strip())
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and is_loopback_host_header(parts.netloc)


def check_bind(config: PlaygroundConfig, host: str | None = None) -> None:
    """Refuse to listen beyond loopback without a login: the playground edits training data."""
    host = host if host is not None else config.host
    if not config.login_required and not is_loopback(host):
        raise PlaygroundError(
            f"refusing to serve the playground on {host} without a login: set KBLOOP_PLAYGROUND_AUTH=user:password "
            "(comma-separated pairs) or listen on 127.0.0.1"
        )

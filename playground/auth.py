"""Who is using the playground, and whether they may do admin things. Checked in every admin handler.

Hiding the Training tab is a courtesy; the handlers below are the gate. In front of them:
- `PlaygroundGuard` (ASGI middleware): without a login, requests must be addressed to loopback by name
  (Host) and come from no foreign page (Origin), so a web page the curator visits cannot drive the app
  by DNS rebinding or a cross-site request;
- `LoginGate` (Gradio's `auth` callable): checks passwords, and makes repeated failures wait.
"""

from __future__ import annotations

import contextvars
import hmac
import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from playground.config import PlaygroundConfig, PlaygroundError, is_loopback_host_header, is_loopback_origin
from store.audit import record_audit

log = logging.getLogger("kbloop.playground.auth")

LOCAL_USER = "local"

# The address of the request being served, set by PlaygroundGuard: Gradio's `auth` callable is given only
# the user name and the password, and the login wait is per address too.
client_address: contextvars.ContextVar[str] = contextvars.ContextVar("kbloop_playground_client", default="unknown")


@dataclass(frozen=True)
class Viewer:
    name: str
    is_admin: bool


class AdminRequired(PlaygroundError):
    pass


def viewer_for(username: str | None, config: PlaygroundConfig) -> Viewer:
    """The logged-in curator; without a login (loopback only) the user is "local", an admin only when
    KBLOOP_PLAYGROUND_LOCAL_ADMIN says so: whoever can reach 127.0.0.1 is not vetted by anyone."""
    if not config.login_required:
        return Viewer(name=LOCAL_USER, is_admin=config.local_admin)
    if not username:
        # Gradio only lets logged-in sessions call handlers when auth is set; never guess a name.
        raise PlaygroundError("not logged in")
    return Viewer(name=username, is_admin=username in config.admins)


def viewer_from_request(request, config: PlaygroundConfig) -> Viewer:
    return viewer_for(getattr(request, "username", None) if request is not None else None, config)


def require_admin(db, viewer: Viewer, action: str, *, target: str | None = None) -> None:
    """Raise AdminRequired (and record the refusal in the audit log) unless `viewer` is an admin."""
    if viewer.is_admin:
        return

    setting = "KBLOOP_PLAYGROUND_LOCAL_ADMIN" if viewer.name == LOCAL_USER else "KBLOOP_PLAYGROUND_ADMINS"
    record_audit(db, actor=f"playground:{viewer.name}", action=action, allowed=False, target=target,
                 detail={"reason": f"not an admin ({setting})"})
    what = action.replace("_", " ")
    if viewer.name == LOCAL_USER:
        raise AdminRequired(f"{viewer.name} may not {what}: without a login only an admin opted in with "
                            "KBLOOP_PLAYGROUND_LOCAL_ADMIN=true may (or log in: KBLOOP_PLAYGROUND_AUTH)")
    raise AdminRequired(f"{viewer.name} may not {what}: only KBLOOP_PLAYGROUND_ADMINS may")


class PlaygroundGuard:
    """ASGI middleware in front of the Gradio app. Records the client's address for LoginGate; without a
    login, answers 400 to a Host that is not a loopback name and 403 to a foreign Origin."""

    def __init__(self, app, *, loopback_only: bool):
        self.app = app
        self.loopback_only = loopback_only

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if self.loopback_only:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            refusal = None
            if not is_loopback_host_header(headers.get("host")):
                refusal = (400, "Bad Request: this playground has no login, so it answers only requests addressed "
                                "to localhost, 127.0.0.1 or [::1] (the Host header); set KBLOOP_PLAYGROUND_AUTH to "
                                "serve it under another name")
            elif "origin" in headers and not is_loopback_origin(headers["origin"]):
                refusal = (403, "Forbidden: this playground has no login and takes no requests from pages of other "
                                "sites (the Origin header)")
            if refusal is not None:
                await _refuse(scope, receive, send, *refusal)
                return
        client = scope.get("client")
        token = client_address.set(client[0] if client else "unknown")
        try:
            await self.app(scope, receive, send)
        finally:
            client_address.reset(token)


async def _refuse(scope, receive, send, status: int, text: str) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})  # before accept: the server answers 403
        return
    body = text.encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class LoginGate:
    """Gradio's `auth` callable: `gate(username, password) -> bool`, sync on purpose (Gradio awaits only
    real coroutine functions; an object with an async __call__ would return a truthy coroutine).

    Failures are counted per user name (known users only) and per client address. After
    `free_failures` in a row (twice that for a user name, so one guessing address locks itself before it
    locks the user out everywhere), each further failure locks that key for `backoff_s`, doubling up to
    `backoff_max_s`; a locked attempt is answered 429 with Retry-After and no password check. A success
    clears the user's count; any count is forgotten after `4 * backoff_max_s` without a failure (long
    enough that waiting out the longest lock does not start a guesser afresh).
    At most `max_tracked` keys are remembered (least recently failed dropped first): bounded memory.
    """

    def __init__(self, accounts, *, free_failures: int = 5, backoff_s: float = 1.0, backoff_max_s: float = 300.0,
                 max_tracked: int = 10_000, clock=time.monotonic):
        self._accounts = {user: password for user, password in accounts}
        self.free_failures = free_failures
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.forget_s = 4 * backoff_max_s
        self.max_tracked = max_tracked
        self._clock = clock
        self._lock = threading.Lock()
        # key -> (failures in a row, locked until, last failure)
        self._failures: OrderedDict[tuple[str, str], tuple[int, float, float]] = OrderedDict()

    @classmethod
    def from_config(cls, config: PlaygroundConfig) -> "LoginGate":
        return cls(config.auth, free_failures=config.login_free_failures, backoff_s=config.login_backoff_s,
                   backoff_max_s=config.login_backoff_max_s)

    def tracked(self) -> int:
        """How many users and addresses have failures remembered (no __len__: an empty gate must stay truthy
        wherever `auth` is tested for truth)."""
        return len(self._failures)

    def __call__(self, username: str, password: str) -> bool:
        address = client_address.get()
        keys = [("address", address)] + ([("user", username)] if username in self._accounts else [])
        with self._lock:
            now = self._clock()
            wait = max(self._wait(key, now) for key in keys)
        if wait > 0:
            from fastapi import HTTPException

            seconds = max(1, math.ceil(wait))
            raise HTTPException(status_code=429, headers={"Retry-After": str(seconds)},
                                detail=f"Too many failed sign-ins: try again in {seconds} s.")
        expected = self._accounts.get(username)
        # Compare against something even for an unknown user, so that the time taken does not tell.
        ok = hmac.compare_digest(password.encode("utf-8"), (expected or "\0" * 32).encode("utf-8")) \
            and expected is not None
        with self._lock:
            now = self._clock()
            if ok:
                self._failures.pop(("user", username), None)
            else:
                for key in keys:
                    self._fail(key, now)
        if not ok:
            log.warning("playground: failed sign-in for %r from %s", username[:64], address)
        return ok

    def _wait(self, key, now: float) -> float:
        entry = self._failures.get(key)
        if entry is None:
            return 0.0
        failures, locked_until, last = entry
        if now - last > self.forget_s and now >= locked_until:
            del self._failures[key]  # quiet for long enough: start afresh
            return 0.0
        return max(0.0, locked_until - now)

    def _fail(self, key, now: float) -> None:
        failures, _, last = self._failures.pop(key, (0, 0.0, now))
        if now - last > self.forget_s:
            failures = 0
        failures += 1
        free = self.free_failures * (2 if key[0] == "user" else 1)
        locked_until = now
        if failures >= free:
            locked_until = now + min(self.backoff_s * 2 ** (failures - free), self.backoff_max_s)
        self._failures[key] = (failures, locked_until, now)
        while len(self._failures) > self.max_tracked:
            self._failures.popitem(last=False)

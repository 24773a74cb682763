"""Who is using the playground, and whether they may do admin things. Checked in every admin handler.

Hiding the Training tab is a courtesy; the handlers below are the gate.
"""

from __future__ import annotations

from dataclasses import dataclass

from playground.config import PlaygroundConfig, PlaygroundError

LOCAL_USER = "local"


@dataclass(frozen=True)
class Viewer:
    name: str
    is_admin: bool


class AdminRequired(PlaygroundError):
    pass


def viewer_for(username: str | None, config: PlaygroundConfig) -> Viewer:
    """The logged-in curator; without a login (loopback only) the user is "local" and an admin."""
    if not config.login_required:
        return Viewer(name=LOCAL_USER, is_admin=True)
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
    from store.audit import record_audit

    record_audit(db, actor=f"playground:{viewer.name}", action=action, allowed=False, target=target,
                 detail={"reason": "not in KBLOOP_PLAYGROUND_ADMINS"})
    raise AdminRequired(f"{viewer.name} may not {action.replace('_', ' ')}: only KBLOOP_PLAYGROUND_ADMINS may")

import pytest

from kbloop.cli import app, run
from playground.auth import AdminRequired, Viewer, require_admin, viewer_for
from playground.config import PlaygroundConfig, PlaygroundError, check_bind, is_loopback
from store.audit import list_audit


def test_loopback_hosts():
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.0.2"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "192.168.1.5", "::", "example.com"))


def test_non_loopback_bind_without_login_is_refused():
    with pytest.raises(PlaygroundError, match="KBLOOP_PLAYGROUND_AUTH"):
        check_bind(PlaygroundConfig(host="0.0.0.0"))
    check_bind(PlaygroundConfig(host="127.0.0.1"))
    check_bind(PlaygroundConfig(host="0.0.0.0", auth=(("alice", "alice-password"),)))


def test_cli_refuses_non_loopback_without_login_in_one_line(capsys, db):
    assert run(app, ["playground", "--host", "0.0.0.0", "--port", "7999"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing to serve the playground on 0.0.0.0" in err[0]


def test_config_from_settings(monkeypatch):
    from kbloop.settings import load_settings

    monkeypatch.setenv("KBLOOP_PLAYGROUND_AUTH", "alice:alice-password,bob:bob-password-1")
    monkeypatch.setenv("KBLOOP_PLAYGROUND_ADMINS", "alice")
    config = PlaygroundConfig.from_settings(load_settings(), host="0.0.0.0", port=9000)
    assert config.auth == (("alice", "alice-password"), ("bob", "bob-password-1")) and config.admins == ("alice",)
    assert config.local_admin is False
    check_bind(config)  # a login is set: any interface is allowed
    assert viewer_for("alice", config) == Viewer("alice", True)
    assert viewer_for("bob", config) == Viewer("bob", False)
    with pytest.raises(PlaygroundError):
        viewer_for(None, config)


def test_without_login_the_user_is_local_and_a_curator_unless_opted_in(monkeypatch):
    """Issue 16 #7: reaching 127.0.0.1 is not vetting; admin rights without a login are an explicit choice."""
    from kbloop.settings import load_settings

    assert viewer_for(None, PlaygroundConfig()) == Viewer("local", False)
    assert viewer_for(None, PlaygroundConfig(local_admin=True)) == Viewer("local", True)
    monkeypatch.setenv("KBLOOP_PLAYGROUND_LOCAL_ADMIN", "true")
    assert PlaygroundConfig.from_settings(load_settings()).local_admin is True
    from kbloop.settings import ENV_EXAMPLE

    assert "# KBLOOP_PLAYGROUND_LOCAL_ADMIN=false" in ENV_EXAMPLE  # `kbloop init` documents it
    # With a login the opt-in means nothing: only KBLOOP_PLAYGROUND_ADMINS are admins.
    with_login = PlaygroundConfig(auth=(("local", "local-password"),), local_admin=True)
    assert viewer_for("local", with_login) == Viewer("local", False)


def test_the_local_user_is_told_how_to_become_an_admin(db):
    with pytest.raises(AdminRequired, match="local may not start retraining: .*KBLOOP_PLAYGROUND_LOCAL_ADMIN=true"):
        require_admin(db, Viewer("local", False), "start_retraining")
    (entry,) = list_audit(db)
    assert entry["actor"] == "playground:local" and entry["allowed"] is False


def test_require_admin_refuses_and_records_it(db):
    with pytest.raises(AdminRequired, match="bob may not promote"):
        require_admin(db, Viewer("bob", False), "promote", target="v2")
    (entry,) = list_audit(db)
    assert entry["actor"] == "playground:bob" and entry["action"] == "promote" and entry["allowed"] is False
    require_admin(db, Viewer("alice", True), "promote")
    assert len(list_audit(db)) == 1


# ------------------------------------------------------------------------------------------ passwords (#15)

@pytest.mark.parametrize("auth, user", [("alice:short", "alice"), ("alice:a-long-password,bob:12345678901", "bob")])
def test_a_short_playground_password_is_refused_at_settings_load_without_showing_it(monkeypatch, auth, user):
    from kbloop.settings import SettingsError, load_settings

    monkeypatch.setenv("KBLOOP_PLAYGROUND_AUTH", auth)
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert message.startswith("KBLOOP_PLAYGROUND_AUTH: ") and f"user {user!r}" in message and "12 characters" in message
    password = auth.split(",")[-1].split(":", 1)[1]
    assert password not in message.replace("shorter", "") and "\n" not in message
    with pytest.raises(PlaygroundError, match=f"KBLOOP_PLAYGROUND_AUTH: the password of user '{user}'"):
        PlaygroundConfig(auth=tuple(tuple(p.split(":", 1)) for p in auth.split(",")))


def test_a_malformed_auth_entry_is_not_quoted(monkeypatch):
    from kbloop.settings import SettingsError, load_settings

    monkeypatch.setenv("KBLOOP_PLAYGROUND_AUTH", "alice:a-long-password,hunter2hunter2hunter2")
    with pytest.raises(SettingsError, match="entry 2 is not") as info:
        load_settings()
    assert "hunter2" not in str(info.value)


def test_cli_refuses_a_short_password_in_one_line(capsys, db, monkeypatch):
    monkeypatch.setenv("KBLOOP_PLAYGROUND_AUTH", "alice:pw")
    assert run(app, ["playground", "--port", "7999"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "KBLOOP_PLAYGROUND_AUTH" in err[0] and "'alice'" in err[0] and ":pw" not in err[0]


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _gate(**kw):
    from playground.auth import LoginGate

    clock = Clock()
    gate = LoginGate([("alice", "alice-password")], clock=clock, **{"free_failures": 3, "backoff_s": 1.0,
                                                                     "backoff_max_s": 60.0, **kw})
    return gate, clock


def test_login_gate_checks_passwords_and_returns_a_plain_bool():
    gate, _ = _gate()
    assert gate("alice", "alice-password") is True
    assert gate("alice", "alice-passwore") is False
    assert gate("mallory", "alice-password") is False


def test_login_gate_makes_repeated_failures_wait_longer_each_time():
    from fastapi import HTTPException

    gate, clock = _gate()
    assert [gate("alice", "nope") for _ in range(3)] == [False] * 3
    with pytest.raises(HTTPException) as info:
        gate("alice", "alice-password")  # right, but locked: not even checked
    assert info.value.status_code == 429 and info.value.headers["Retry-After"] == "1"
    clock.t += 1.01
    assert gate("alice", "nope") is False  # the 4th failure: 2 s now
    clock.t += 1.5
    with pytest.raises(HTTPException) as info:
        gate("alice", "alice-password")
    assert info.value.headers["Retry-After"] == "1"
    clock.t += 0.6
    assert gate("alice", "alice-password") is True
    clock.t += 241  # four times the longest wait without a failure: the address starts afresh
    assert [gate("alice", "nope") for _ in range(2)] == [False, False]
    assert gate("alice", "alice-password") is True


def test_login_gate_waits_are_capped_and_its_memory_is_bounded():
    from fastapi import HTTPException

    from playground.auth import client_address

    gate, clock = _gate(backoff_max_s=10.0, max_tracked=100)
    waits = []
    for _ in range(30):
        try:
            gate("alice", "nope")
        except HTTPException as exc:
            waits.append(int(exc.headers["Retry-After"]))
            clock.t += waits[-1] + 0.01
    assert max(waits) == 10 and waits[-1] == 10  # doubled up to the cap, and no further
    for i in range(1000):  # a spray from many addresses, at unknown and known names
        token = client_address.set(f"10.0.{i // 256}.{i % 256}")
        try:
            gate(f"user{i}", "nope")
        finally:
            client_address.reset(token)
    assert gate.tracked() <= 100 and bool(gate)

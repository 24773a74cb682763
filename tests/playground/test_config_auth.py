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
    check_bind(PlaygroundConfig(host="0.0.0.0", auth=(("alice", "pw"),)))


def test_cli_refuses_non_loopback_without_login_in_one_line(capsys, db):
    assert run(app, ["playground", "--host", "0.0.0.0", "--port", "7999"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing to serve the playground on 0.0.0.0" in err[0]


def test_config_from_settings(monkeypatch):
    from kbloop.settings import load_settings

    monkeypatch.setenv("KBLOOP_PLAYGROUND_AUTH", "alice:pw1,bob:pw2")
    monkeypatch.setenv("KBLOOP_PLAYGROUND_ADMINS", "alice")
    config = PlaygroundConfig.from_settings(load_settings(), host="0.0.0.0", port=9000)
    assert config.auth == (("alice", "pw1"), ("bob", "pw2")) and config.admins == ("alice",)
    check_bind(config)  # a login is set: any interface is allowed
    assert viewer_for("alice", config) == Viewer("alice", True)
    assert viewer_for("bob", config) == Viewer("bob", False)
    with pytest.raises(PlaygroundError):
        viewer_for(None, config)


def test_without_login_the_user_is_local_and_admin():
    assert viewer_for(None, PlaygroundConfig()) == Viewer("local", True)


def test_require_admin_refuses_and_records_it(db):
    with pytest.raises(AdminRequired, match="bob may not promote"):
        require_admin(db, Viewer("bob", False), "promote", target="v2")
    (entry,) = list_audit(db)
    assert entry["actor"] == "playground:bob" and entry["action"] == "promote" and entry["allowed"] is False
    require_admin(db, Viewer("alice", True), "promote")
    assert len(list_audit(db)) == 1

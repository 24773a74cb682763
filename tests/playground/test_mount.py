"""Mounting the playground inside a FastAPI app (how `kbloop serve` hosts it at /playground)."""

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from playground import PlaygroundConfig, PlaygroundError, build_playground, mount_playground


def test_mounted_at_playground(db_path, db):
    config = PlaygroundConfig(auth=(("alice", "alice-password"),), admins=("alice",))
    app = mount_playground(FastAPI(), build_playground(config=config, engine=None, db_path=db_path), config=config)
    with TestClient(app) as http:
        assert http.get("/playground/config").status_code == 401  # the login applies to the mounted app too
        assert http.post("/playground/login", data={"username": "alice", "password": "alice-password"}).status_code == 200
        assert http.get("/playground/config").status_code == 200


def test_mount_refuses_a_public_host_without_login(db_path, db):
    config = PlaygroundConfig(host="0.0.0.0")
    with pytest.raises(PlaygroundError, match="without a login"):
        mount_playground(FastAPI(), build_playground(config=config, engine=None, db_path=db_path), config=config)


def test_mounted_without_login_only_loopback_names_reach_the_playground(db_path, db):
    """`kbloop serve` on loopback: the guard covers /playground; /slack/events (signed, and reached through
    tunnels under public names) and the rest of the app keep their own rules."""
    config = PlaygroundConfig()
    parent = FastAPI()

    @parent.get("/elsewhere")
    def elsewhere():
        return {"ok": True}

    app = mount_playground(parent, build_playground(config=config, engine=None, db_path=db_path), config=config)
    with TestClient(app, base_url="http://127.0.0.1:8000") as http:
        assert http.get("/playground/config").status_code == 200
        assert http.get("/playground/config", headers={"Host": "localhost:8000"}).status_code == 200
        assert http.get("/playground/config", headers={"Host": "evil.example:8000"}).status_code == 400
        assert http.get("/elsewhere", headers={"Host": "tunnel.example"}).status_code == 200

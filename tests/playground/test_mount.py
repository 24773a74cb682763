"""Mounting the playground inside a FastAPI app (how `kbloop serve` hosts it at /playground)."""

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from playground import PlaygroundConfig, PlaygroundError, build_playground, mount_playground


def test_mounted_at_playground(db_path, db):
    config = PlaygroundConfig(auth=(("alice", "pw"),), admins=("alice",))
    app = mount_playground(FastAPI(), build_playground(config=config, engine=None, db_path=db_path), config=config)
    with TestClient(app) as http:
        assert http.get("/playground/config").status_code == 401  # the login applies to the mounted app too
        assert http.post("/playground/login", data={"username": "alice", "password": "pw"}).status_code == 200
        assert http.get("/playground/config").status_code == 200


def test_mount_refuses_a_public_host_without_login(db_path, db):
    config = PlaygroundConfig(host="0.0.0.0")
    with pytest.raises(PlaygroundError, match="without a login"):
        mount_playground(FastAPI(), build_playground(config=config, engine=None, db_path=db_path), config=config)

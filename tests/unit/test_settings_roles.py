"""`load_settings(role=...)`: the role's broker user from the endpoint file of `runledger up`,
the role's inbox prefix, and the environment's own credentials or URL first."""

from __future__ import annotations

import json

import pytest

from runledger.infra.settings import load_settings


@pytest.fixture
def endpoint(tmp_path, monkeypatch):
    for var in ("RUNLEDGER_NATS_URL", "RUNLEDGER_NATS_USER", "RUNLEDGER_NATS_PASSWORD", "RUNLEDGER_NATS_TOKEN",
                "RUNLEDGER_NATS_CREDS_FILE", "RUNLEDGER_INBOX_PREFIX", "RUNLEDGER_NAMESPACE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RUNLEDGER_CONFIG_DIR", str(tmp_path))
    users = {r: {"user": r, "password": f"pw-{r}"} for r in ("service", "client", "analyst")}
    (tmp_path / "endpoint.json").write_text(json.dumps({"nats_url": "nats://127.0.0.1:5000", "nats_users": users}))
    return monkeypatch


def test_each_role_gets_its_user_and_inbox(endpoint):
    for role in ("client", "analyst", "service"):
        s = load_settings(role=role)
        assert (s.nats_user, s.nats_password.get_secret_value(), s.inbox_prefix) == (role, f"pw-{role}", f"_INBOX.{role}")
    assert load_settings().nats_user == "client"


def test_the_environment_wins(endpoint):
    endpoint.setenv("RUNLEDGER_NATS_USER", "someone")
    endpoint.setenv("RUNLEDGER_NATS_PASSWORD", "secret")
    endpoint.setenv("RUNLEDGER_INBOX_PREFIX", "_INBOX.mine")
    s = load_settings(role="analyst")
    assert (s.nats_user, s.nats_password.get_secret_value(), s.inbox_prefix) == ("someone", "secret", "_INBOX.mine")


def test_recorded_users_are_not_sent_to_another_server(endpoint):
    endpoint.setenv("RUNLEDGER_NATS_URL", "nats://elsewhere:4222")
    s = load_settings(role="client")
    assert s.nats_user is None and s.nats_password is None
    assert s.inbox_prefix == "_INBOX.client"


def test_unknown_role():
    with pytest.raises(ValueError):
        load_settings(role="admin")

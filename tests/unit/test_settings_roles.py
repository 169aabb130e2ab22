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


@pytest.mark.parametrize(("user", "js_api_prefix"), [
    ("analyst", "$JS.READ.API"), ("task_worker", "$JS.TASK.API"), ("task_worker_billing", "$JS.TASK.API"),
    ("client", "$JS.API"), ("service", "$JS.API"), ("someone", "$JS.API"),
])
def test_role_users_from_the_environment_get_their_accounts_jetstream_prefix(endpoint, user, js_api_prefix):
    """The analyst's and task workers' accounts import JetStream under prefixes of their own: with
    their credentials from the environment and no RUNLEDGER_JS_API_PREFIX, `$JS.API` would
    time out (the role may not publish there)."""
    endpoint.delenv("RUNLEDGER_JS_API_PREFIX", raising=False)
    endpoint.setenv("RUNLEDGER_NATS_USER", user)
    endpoint.setenv("RUNLEDGER_NATS_PASSWORD", "secret")
    for role in ("analyst", "task_worker", "client"):
        assert load_settings(role=role).js_api_prefix == js_api_prefix, role


def test_an_explicit_jetstream_prefix_wins(endpoint):
    endpoint.setenv("RUNLEDGER_NATS_USER", "analyst")
    endpoint.setenv("RUNLEDGER_NATS_PASSWORD", "secret")
    endpoint.setenv("RUNLEDGER_JS_API_PREFIX", "$JS.OTHER.API")
    assert load_settings(role="analyst").js_api_prefix == "$JS.OTHER.API"


def test_an_endpoint_file_without_prefixes_keeps_the_service_accounts(endpoint):
    """An endpoint file names no prefix when an `up` older than the accounts of their own wrote
    it: its analyst lives in the service's account, under `$JS.API`."""
    endpoint.delenv("RUNLEDGER_JS_API_PREFIX", raising=False)
    assert load_settings(role="analyst").js_api_prefix == "$JS.API"
    assert load_settings(role="client").js_api_prefix == "$JS.API"


def test_a_bound_task_worker_from_the_environment_receives_on_its_own_inbox(endpoint):
    """`task_worker_<name>` may subscribe under `_INBOX.task_worker_<name>` only."""
    endpoint.setenv("RUNLEDGER_NATS_USER", "task_worker_billing")
    endpoint.setenv("RUNLEDGER_NATS_PASSWORD", "secret")
    assert load_settings("task_worker", user="task_worker_billing").inbox_prefix == "_INBOX.task_worker_billing"
    assert load_settings("task_worker").inbox_prefix == "_INBOX.task_worker_billing"
    endpoint.setenv("RUNLEDGER_INBOX_PREFIX", "_INBOX.mine")
    assert load_settings("task_worker").inbox_prefix == "_INBOX.mine"

"""The broker roles have one definition (infra/broker_auth.py): the checked-in compose
configuration is its output, and the generated configurations are valid for nats-server."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from runledger.infra import broker_auth
from runledger.infra.embedded import nats_server_binary

ROOT = Path(__file__).resolve().parents[2]


def test_deploy_config_is_the_generators_output():
    assert (ROOT / "deploy" / "nats.conf").read_text() == broker_auth.compose_config("runledger"), (
        "deploy/nats.conf differs from infra/broker_auth.py: regenerate it with "
        "`runledger broker-config --namespace runledger > deploy/nats.conf`")


def test_generated_configs_are_valid_and_sync_always(tmp_path):
    env = {**os.environ, **{broker_auth.env_var(r): broker_auth.new_password() for r in broker_auth.ROLES}}
    literal = broker_auth.nats_config("t1", {r: broker_auth.new_password() for r in broker_auth.ROLES}, str(tmp_path))
    for name, text in (("compose.conf", broker_auth.compose_config()), ("up.conf", literal)):
        assert "  sync_interval: always\n" in text
        path = tmp_path / name
        path.write_text(text)
        done = subprocess.run([str(nats_server_binary()), "-c", str(path), "-t"], env=env, capture_output=True,
                              text=True, timeout=30)
        assert done.returncode == 0, done.stdout + done.stderr


def test_compose_config_needs_the_passwords(tmp_path):
    path = tmp_path / "nats.conf"
    path.write_text(broker_auth.compose_config())
    env = {k: v for k, v in os.environ.items() if not k.endswith("_PASSWORD")}
    done = subprocess.run([str(nats_server_binary()), "-c", str(path), "-t"], env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode != 0 and "RUNLEDGER_SERVICE_PASSWORD" in done.stdout + done.stderr


def test_local_credentials_are_made_once_and_private(tmp_path):
    first = broker_auth.local_credentials(tmp_path)
    assert broker_auth.local_credentials(tmp_path) == first
    assert (tmp_path / "credentials.json").stat().st_mode & 0o777 == 0o600
    config = broker_auth.write_local_config(tmp_path, "t1", first, tmp_path / "nats")
    assert config.stat().st_mode & 0o777 == 0o600
    assert first["service"]["password"] in config.read_text()


def test_client_and_analyst_cannot_publish_to_the_log():
    perms = broker_auth.role_permissions("ns", ["projection_x"])
    for role in ("client", "analyst"):
        allowed = perms[role]["publish"]["allow"]
        assert not [s for s in allowed if s.startswith(("ns.evt", "ns.idem", "$KV.", "$JS.API.STREAM.PURGE",
                                                        "$JS.API.STREAM.DELETE", "$JS.ACK"))]
    assert f"{broker_auth.ANALYST_JS_API}.CONSUMER.DELETE.NS_EVENTS.projection_x" in perms["analyst"]["publish"]["deny"]
    # The analyst reaches the JetStream API only through its account's imports, and of the
    # service's subjects only the read-only queries it imports (`ReadEvents`).
    assert all(s.startswith(broker_auth.ANALYST_JS_API + ".") or s in ("ns.qry.ReadEvents",)
               for s in perms["analyst"]["publish"]["allow"])


def test_the_analyst_has_an_account_of_its_own():
    text = broker_auth.compose_config()
    service, analyst = text.split("  ANALYST {")
    assert '"service"' in service and '"client"' in service and '"analyst"' not in service
    assert '"analyst"' in analyst and "jetstream" not in analyst


def test_the_analyst_imports_only_the_read_events_query():
    perms = broker_auth.role_permissions("ns", ["projection_x"])
    assert [s for s in perms["analyst"]["publish"]["allow"] if s.startswith("ns.")] == ["ns.qry.ReadEvents"]
    assert not [s for s in perms["analyst"]["subscribe"]["allow"] if s.startswith("ns.")]
    assert "_R_.>" in perms["service"]["publish"]["allow"]  # replies to what crosses the import
    text = broker_auth.compose_config("ns")
    service, analyst = text.split("  ANALYST {")
    assert '{service: "ns.qry.ReadEvents", response_type: singleton, accounts: ["ANALYST"]}' in service
    assert '{service: {account: "RUNLEDGER", subject: "ns.qry.ReadEvents"}}' in analyst
    # No other query crosses accounts (the task worker's own `GetTaskRun` stays in the service's).
    assert "ns.cmd" not in analyst and [line for line in text.splitlines() if "ns.qry." in line and "ReadEvents" not in line
                                        and "service:" in line] == []
    assert "GetTaskRun" not in analyst

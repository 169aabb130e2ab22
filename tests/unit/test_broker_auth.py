"""The broker roles have one definition (infra/broker_auth.py): the checked-in compose
configuration is its output, and the generated configurations are valid for nats-server."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from runledger.infra import broker_auth
from runledger.infra.embedded import nats_server_binary

ROOT = Path(__file__).resolve().parents[2]


def _accounts(text: str) -> dict[str, str]:
    """The configuration text of each account, by name."""
    names = (broker_auth.SERVICE_ACCOUNT, broker_auth.ANALYST_ACCOUNT, broker_auth.TASK_WORKER_ACCOUNT)
    starts = sorted((text.index(f"\n  {name} {{\n"), name) for name in names)
    ends = [start for start, _ in starts[1:]] + [len(text)]
    return {name: text[start:end] for (start, name), end in zip(starts, ends, strict=True)}


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
    # The roles in accounts of their own carry the prefix of their imported JetStream API.
    assert first["analyst"]["js_api_prefix"] == broker_auth.ANALYST_JS_API
    assert first["task_worker"]["js_api_prefix"] == broker_auth.TASK_WORKER_JS_API
    assert all("js_api_prefix" not in first[r] for r in ("client", "service", "admin"))  # `$JS.API`


def test_credentials_made_before_the_task_workers_account_get_its_prefix(tmp_path):
    old = broker_auth.new_credentials()
    del old["task_worker"]["js_api_prefix"]
    (tmp_path / "credentials.json").write_text(json.dumps(old))
    creds = broker_auth.local_credentials(tmp_path)
    assert creds["task_worker"] == {**old["task_worker"], "js_api_prefix": broker_auth.TASK_WORKER_JS_API}
    assert {r: c["password"] for r, c in creds.items()} == {r: c["password"] for r, c in old.items()}
    assert json.loads((tmp_path / "credentials.json").read_text()) == creds  # as `up` records them


def test_a_data_dir_made_before_the_admin_role_gets_its_password_and_keeps_the_others(tmp_path):
    old = broker_auth.new_credentials()
    del old["admin"]
    (tmp_path / "credentials.json").write_text(json.dumps(old))
    creds = broker_auth.local_credentials(tmp_path)
    assert creds["admin"]["user"] == "admin" and creds["admin"]["password"]
    assert {r: c for r, c in creds.items() if r != "admin"} == old
    assert json.loads((tmp_path / "credentials.json").read_text()) == creds
    config = broker_auth.write_local_config(tmp_path, "t1", creds, tmp_path / "nats").read_text()
    assert 'user: "admin"' in _accounts(config)[broker_auth.SERVICE_ACCOUNT]


OWN_STREAMS = ("NS_EVENTS", "KV_NS_SNAPSHOTS", "KV_NS_LEASES", "KV_NS_TASK_WORKERS", "NS_TASKS", "NS_TASK_RETRIES",
               "NS_TASK_RESULTS")


def test_only_the_admin_creates_or_updates_streams_and_it_cannot_erase_or_write_the_log():
    """The service's credentials could shrink the log's limits while they could update its
    stream: stream setup and upgrades are the admin's alone, and the admin reaches nothing
    else (no purge or delete, no event, no bucket key, no consumer)."""
    perms = broker_auth.role_permissions("ns", ["projection_x"])
    admin = perms["admin"]["publish"]["allow"]
    assert sorted(admin) == sorted(["$JS.API.INFO", *(f"$JS.API.STREAM.{op}.{s}" for s in OWN_STREAMS
                                                      for op in ("INFO", "CREATE", "UPDATE"))])
    assert perms["admin"]["subscribe"]["allow"] == ["_INBOX.admin.>"]
    assert not [s for s in admin if "PURGE" in s or "DELETE" in s or "*" in s or ">" in s]
    service = perms["service"]["publish"]["allow"]
    assert not [s for s in service if ".STREAM.CREATE." in s or ".STREAM.UPDATE." in s]
    # What the service keeps: its streams' info, the consumers, direct gets, its buckets' upkeep.
    for s in OWN_STREAMS:
        assert {f"$JS.API.STREAM.INFO.{s}", f"$JS.API.DIRECT.GET.{s}", f"$JS.API.CONSUMER.CREATE.{s}.>"} <= set(service)
    assert "$JS.API.STREAM.PURGE.KV_NS_LEASES" in service and "$JS.API.STREAM.PURGE.NS_EVENTS" not in service
    for role in ("client", "analyst", "task_worker"):
        assert not [s for s in perms[role]["publish"]["allow"] if ".STREAM.CREATE." in s or ".STREAM.UPDATE." in s]
    # In the service's account (the one with JetStream), reaching it under `$JS.API`.
    accounts = _accounts(broker_auth.compose_config("ns"))
    assert 'user: "admin"' in accounts[broker_auth.SERVICE_ACCOUNT]
    assert "admin" not in broker_auth.JS_API_PREFIXES
    assert broker_auth.env_references()["admin"] == "$RUNLEDGER_ADMIN_PASSWORD"
    assert "RUNLEDGER_ADMIN_PASSWORD=rl" in broker_auth.dotenv()


def test_client_and_analyst_cannot_publish_to_the_log():
    perms = broker_auth.role_permissions("ns", ["projection_x"])
    for role in ("client", "analyst"):
        allowed = perms[role]["publish"]["allow"]
        assert not [s for s in allowed if s.startswith(("ns.evt", "ns.idem", "$KV.", "$JS.API.STREAM.PURGE",
                                                        "$JS.API.STREAM.DELETE", "$JS.ACK"))]
    allowed = perms["task_worker"]["publish"]["allow"]
    assert not [s for s in allowed if s.startswith(("ns.evt", "ns.idem", "ns.task.", "$JS.API", "$KV.NS_SNAPSHOTS",
                                                    "$KV.NS_LEASES", "$JS.ACK.NS_EVENTS", "$JS.ACK.KV_"))]
    assert f"{broker_auth.ANALYST_JS_API}.CONSUMER.DELETE.NS_EVENTS.projection_x" in perms["analyst"]["publish"]["deny"]
    # The analyst reaches the JetStream API only through its account's imports, and of the
    # service's subjects only the read-only queries it imports (`ReadEvents`).
    assert all(s.startswith(broker_auth.ANALYST_JS_API + ".") or s in ("ns.qry.ReadEvents",)
               for s in perms["analyst"]["publish"]["allow"])


def test_only_the_service_announces_freed_tag_slots_and_only_task_workers_hear_them():
    """`<ns>.taskrun.tagfreed.<tag>`: published by the service alone (a forged notice would make
    waiting runs ask again early), heard by every task worker, bound or not, and by nobody else."""
    perms = broker_auth.role_permissions("ns", ["projection_x"])
    bound = broker_auth.bound_task_worker_permissions("ns", "task_worker_adder", ["add"])
    assert broker_auth.tag_freed_subject("ns") == "ns.taskrun.tagfreed.*"
    assert "ns.taskrun.tagfreed.*" in perms["service"]["publish"]["allow"]
    for role, p in [*((r, perms[r]) for r in ("client", "analyst", "task_worker")), ("bound", bound)]:
        assert not [s for s in p["publish"]["allow"] if s.startswith(("ns.taskrun", "ns.>", ">"))], role
    assert "ns.taskrun.tagfreed.*" in perms["task_worker"]["subscribe"]["allow"]
    assert "ns.taskrun.tagfreed.*" in bound["subscribe"]["allow"]
    for role in ("client", "analyst"):
        assert not [s for s in perms[role]["subscribe"]["allow"] if "tagfreed" in s or s in ("ns.>", "ns.taskrun.>")]


def test_the_analyst_and_the_task_worker_have_accounts_of_their_own():
    accounts = _accounts(broker_auth.compose_config())
    service, analyst, worker = (accounts[a] for a in (broker_auth.SERVICE_ACCOUNT, broker_auth.ANALYST_ACCOUNT,
                                                       broker_auth.TASK_WORKER_ACCOUNT))
    assert '"service"' in service and '"client"' in service and "jetstream: enabled" in service
    assert '"analyst"' not in service and '"task_worker"' not in service
    assert '"analyst"' in analyst and "jetstream" not in analyst and '"task_worker"' not in analyst
    assert '"task_worker"' in worker and "jetstream" not in worker and '"analyst"' not in worker


def test_the_analyst_imports_only_the_read_events_query():
    perms = broker_auth.role_permissions("ns", ["projection_x"])
    assert [s for s in perms["analyst"]["publish"]["allow"] if s.startswith("ns.")] == ["ns.qry.ReadEvents"]
    assert not [s for s in perms["analyst"]["subscribe"]["allow"] if s.startswith("ns.")]
    assert "_R_.>" in perms["service"]["publish"]["allow"]  # replies to what crosses the import
    accounts = _accounts(broker_auth.compose_config("ns"))
    service, analyst = accounts[broker_auth.SERVICE_ACCOUNT], accounts[broker_auth.ANALYST_ACCOUNT]
    assert '{service: "ns.qry.ReadEvents", response_type: singleton, accounts: ["ANALYST"]}' in service
    assert '{service: {account: "RUNLEDGER", subject: "ns.qry.ReadEvents"}}' in analyst
    # No other query, and no command, crosses into the analyst's account.
    assert "ns.cmd" not in analyst and [line for line in analyst.splitlines() if "ns.qry." in line
                                        and "ReadEvents" not in line] == []


def test_the_task_worker_imports_what_it_uses_and_nothing_else():
    perms = broker_auth.role_permissions("ns", ["projection_x"])
    api = broker_auth.TASK_WORKER_JS_API
    assert sorted(perms["task_worker"]["publish"]["allow"]) == sorted([
        *(f"{api}.CONSUMER.{what}.{s}{tail}" for s in ("NS_TASKS", "NS_TASK_RETRIES")
          for what, tail in (("CREATE", ".*.>"), ("INFO", ".*"), ("MSG.NEXT", ".*"))),
        "$JS.ACK.NS_TASKS.>", "$JS.ACK.NS_TASK_RETRIES.>", "$KV.NS_TASK_WORKERS.>", "ns.result.>",
        "ns.cmd.CreateTaskRun", "ns.cmd.CreateTaskRuns", "ns.cmd.SetTaskRunState", "ns.cmd.SetTaskRunStates",
        "ns.qry.GetTaskRun",
        "ns.qry.GetServiceHealth",
        "ns.qry.GetTaskRunResult",
    ])
    assert perms["task_worker"]["subscribe"]["allow"] == ["_INBOX.task_worker.>", "ns.taskrun.finished.>",
                                                          "ns.taskrun.cancel.*.*", "ns.taskrun.tagfreed.*"]
    assert "deny" not in perms["task_worker"]["publish"]
    accounts = _accounts(broker_auth.compose_config("ns"))
    service, worker = accounts[broker_auth.SERVICE_ACCOUNT], accounts[broker_auth.TASK_WORKER_ACCOUNT]
    imports = [line.strip() for line in worker.split("imports: [")[1].splitlines() if line.strip().startswith("{")]
    # Every subject it may publish to is an import from the service's account, the JetStream API
    # renamed under its prefix (one reply, or a stream of them for a pull request) ...
    for subject in perms["task_worker"]["publish"]["allow"]:
        if subject.startswith(api + "."):
            inner = "$JS.API" + subject[len(api):]
            assert (f'{{service: {{account: "RUNLEDGER", subject: "{inner}"}}, to: "{subject}"}}') in imports
            kind = "stream" if ".MSG.NEXT." in subject else "singleton"
            assert f'{{service: "{inner}", response_type: {kind}, accounts: ["TASK_WORKERS"]}}' in service
        else:
            # Its commands carry who sent them (the broker's `Nats-Request-Info`, with the user).
            share = ", share: true" if ".cmd." in subject else ""
            assert f'{{service: {{account: "RUNLEDGER", subject: "{subject}"}}{share}}}' in imports
            assert f'{{service: "{subject}", response_type: singleton, accounts: ["TASK_WORKERS"]}}' in service
    # ... and the notices of finished and of cancelled runs and of freed tag slots, streams it
    # hears; nothing else crosses.
    for notices in ("ns.taskrun.finished.>", "ns.taskrun.cancel.*.*", "ns.taskrun.tagfreed.*"):
        assert f'{{stream: {{account: "RUNLEDGER", subject: "{notices}"}}}}' in imports
        assert f'{{stream: "{notices}", accounts: ["TASK_WORKERS"]}}' in service
    assert len(imports) == len(perms["task_worker"]["publish"]["allow"]) + 3
    assert len([line for line in service.splitlines() if '"TASK_WORKERS"' in line]) == len(imports)


def test_a_task_worker_bound_to_keys_reaches_only_its_keys_consumers_and_heartbeats():
    from runledger.infra.task_queues import consumer_name

    config = broker_auth.nats_config("ns", {**{r: "p" for r in broker_auth.ROLES}, "task_worker_adder": "q"}, "/d",
                                     task_worker_keys={"adder": ["add", "sub"]})
    worker = _accounts(config)[broker_auth.TASK_WORKER_ACCOUNT]
    assert 'user: "task_worker_adder"' in worker and 'password: "q"' in worker
    perms = broker_auth.bound_task_worker_permissions("ns", "task_worker_adder", ["add", "sub"])
    allowed = perms["publish"]["allow"]
    api = broker_auth.TASK_WORKER_JS_API
    for key in ("add", "sub"):
        for stream, side in (("NS_TASKS", "scheduled"), ("NS_TASK_RETRIES", "retry")):
            c = consumer_name(key, side)
            assert {f"{api}.CONSUMER.CREATE.{stream}.{c}.>", f"{api}.CONSUMER.MSG.NEXT.{stream}.{c}",
                    f"$JS.ACK.{stream}.{c}.>"} <= set(allowed)
    assert not [s for s in allowed if s.endswith(".*.>") or s.endswith(".*") or s in ("$JS.ACK.NS_TASKS.>",)]
    assert "$KV.NS_TASK_WORKERS.task_worker_adder.>" in allowed and "$KV.NS_TASK_WORKERS.>" not in allowed
    # The cancel notices of its keys only (each key one subject token); the tag-freed notices of
    # every tag (a run of its keys may carry any).
    assert perms["subscribe"]["allow"] == ["_INBOX.task_worker_adder.>", "ns.taskrun.finished.>",
                                           "ns.taskrun.cancel.add.*", "ns.taskrun.cancel.sub.*",
                                           "ns.taskrun.tagfreed.*"]
    with pytest.raises(ValueError, match="task_worker_adder"):
        broker_auth.nats_config("ns", {r: "p" for r in broker_auth.ROLES}, "/d", task_worker_keys={"adder": ["add"]})


def test_a_cluster_nodes_config_is_valid_and_its_routes_log_in(tmp_path):
    node = broker_auth.ClusterNode("n1", ["n2:6222", "nats://10.0.0.3:6222"], "p@ss/word")
    text = broker_auth.compose_config(cluster=node)
    assert 'server_name: "n1"' in text
    # The node checks the password from its environment; the routes carry it (URL-quoted).
    assert "password: $RUNLEDGER_ROUTE_PASSWORD" in text
    assert '"nats://route:p%40ss%2Fword@n2:6222"' in text and '"nats://route:p%40ss%2Fword@10.0.0.3:6222"' in text
    path = tmp_path / "node.conf"
    path.write_text(text)
    env = {**os.environ, **{broker_auth.env_var(r): broker_auth.new_password() for r in broker_auth.ROLES},
           broker_auth.ROUTE_PASSWORD_VAR: "p@ss/word"}
    done = subprocess.run([str(nats_server_binary()), "-c", str(path), "-t"], env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "cluster {" not in broker_auth.compose_config()  # one server: no cluster block


@pytest.mark.parametrize(("name", "routes", "password", "says"), [
    ("n 1", ["n2:6222"], "pw", "server name"),
    ("n1", ["n2"], "pw", "route address"),
    ("n1", ["n2:6222/x"], "pw", "route address"),
    ("n1", ["n2:6222"], "", "RUNLEDGER_ROUTE_PASSWORD"),
])
def test_a_cluster_node_refuses_what_would_make_a_broken_config(name, routes, password, says):
    with pytest.raises(ValueError, match=says):
        broker_auth.ClusterNode(name, routes, password)


def test_broker_config_writes_a_cluster_node_only_with_a_route_password(monkeypatch):
    from typer.testing import CliRunner

    from runledger.cli.main import _register, app

    _register()
    monkeypatch.delenv(broker_auth.ROUTE_PASSWORD_VAR, raising=False)
    cli = CliRunner()
    refused = cli.invoke(app, ["broker-config", "--server-name", "n1", "--route", "n2:6222"])
    assert refused.exit_code == 2 and "RUNLEDGER_ROUTE_PASSWORD" in refused.output
    half = cli.invoke(app, ["broker-config", "--server-name", "n1"])
    assert half.exit_code == 2 and "--route" in half.output
    monkeypatch.setenv(broker_auth.ROUTE_PASSWORD_VAR, "s3cret")
    done = cli.invoke(app, ["broker-config", "--server-name", "n1", "--route", "n2:6222", "--route", "n3:6222"])
    assert done.exit_code == 0, done.output
    assert '"nats://route:s3cret@n2:6222"' in done.stdout and '"nats://route:s3cret@n3:6222"' in done.stdout
    assert broker_auth.ROUTE_PASSWORD_VAR in cli.invoke(app, ["broker-config", "--env-file"]).stdout


def test_a_cluster_nodes_routes_can_have_tls_and_the_cli_wants_all_three_files(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from runledger.cli.main import _register, app

    tls = broker_auth.RouteTLS("node.pem", "node.key", "ca.pem")
    text = broker_auth.compose_config(cluster=broker_auth.ClusterNode("n1", ["n2:6222"], "pw", tls=tls))
    assert 'cert_file: "node.pem"' in text and 'ca_file: "ca.pem"' in text and "verify: true" in text
    _register()
    monkeypatch.setenv(broker_auth.ROUTE_PASSWORD_VAR, "s3cret")
    half = CliRunner().invoke(app, ["broker-config", "--server-name", "n1", "--route", "n2:6222",
                                    "--route-tls-cert", "node.pem"])
    assert half.exit_code == 2 and "route TLS needs all of" in half.output

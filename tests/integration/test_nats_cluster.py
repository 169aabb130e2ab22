"""runledger on a NATS cluster of three nodes (`RUNLEDGER_NATS_URL` naming all three,
`RUNLEDGER_STREAM_REPLICAS=3`): every stream and bucket it creates has three replicas, and when
the node leading the event log dies (SIGKILL) the service goes on deciding commands once the
other two have chosen a new leader, nothing acknowledged is lost, and the read model equals a
rebuild of the log. Task runs flowing through task workers while the node leading their task
stream dies each run to completion exactly once. A cluster configured as `runledger
broker-config` writes it lets its nodes in through authenticated routes, and nobody else."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import urllib.request
import uuid

import pydantic
import pytest
from typer.testing import CliRunner

from runledger.cli.broker_config import set_up_broker
from runledger.client import RunledgerClient
from runledger.handlers.service import Service
from runledger.infra import broker_auth
from runledger.infra.embedded import EmbeddedNats, EmbeddedNatsCluster, free_port
from runledger.infra.jetstream_setup import ensure_broker
from runledger.infra.nats_connection import connect
from runledger.infra.task_queues import task_stream_name

from .broker import Broker, assert_live_equals_rebuild, cli_env, drop_service_schema
from .task_flow import assert_each_ran_once, submit_flow, task_workers, wait_all_finished

pytestmark = [pytest.mark.timeout(240), pytest.mark.alone]


async def _until_ok(broker: Broker, name: str, /, seconds: float = 60, **body) -> dict:
    """Send a command until the cluster lets it through again (one idempotency key, so a try
    whose reply was lost is not applied twice)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        try:
            out = await broker.cmd(name, **body)
            if out["ok"]:
                return out
            assert out["error"]["code"] == "unavailable", out
        except Exception:  # the test's own connection may be moving to another node
            pass
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{name} did not succeed within {seconds} s of a node's death")
        await asyncio.sleep(0.2)


def _kill(cluster: EmbeddedNatsCluster, server_name: str) -> None:
    """SIGKILL the node of that name, and wait until it is gone."""
    doomed = next(node for node in cluster.nodes if node.server_name == server_name)
    assert doomed.process is not None
    doomed.process.kill()
    doomed.process.wait()


async def test_a_three_node_cluster_loses_nothing_when_the_log_leader_dies(settings, tmp_path):
    cluster = EmbeddedNatsCluster(tmp_path / "cluster", size=3).start()
    settings = settings.model_copy(update={"nats_url": cluster.url, "stream_replicas": 3})
    assert len(settings.nats_servers) == 3
    service = Service(settings)
    nc = None
    try:
        await service.start()
        nc = await connect(settings)
        broker = Broker(nc, settings)
        await broker.ok_cmd("CreateWorkPool", name="replicated", type="process")
        for i in range(10):
            await broker.ok_cmd("CreateWorkQueue", work_pool_name="replicated", name=f"before-{i}")

        js = nc.jetstream()
        ours = [info for info in await js.streams_info() if settings.namespace.upper() in info.config.name]
        names = {info.config.name for info in ours}
        assert {settings.stream_name, f"KV_{settings.lease_bucket}"} <= names, names
        assert {info.config.name: info.config.num_replicas for info in ours} == dict.fromkeys(names, 3)

        leader = (await js.stream_info(settings.stream_name)).cluster.leader
        events_before = await broker.stream_messages()
        _kill(cluster, leader)

        await _until_ok(broker, "CreateWorkQueue", work_pool_name="replicated", name="after-0",
                        idempotency_key="after-0")
        for i in range(1, 10):
            await broker.ok_cmd("CreateWorkQueue", work_pool_name="replicated", name=f"after-{i}")
        assert (await js.stream_info(settings.stream_name)).cluster.leader != leader
        assert await broker.stream_messages() >= events_before + 10

        # The projections bind again (a consumer on the dead node is made again on another)
        # and catch up: 11 – 15 s after the kill on a 2-core machine running all three nodes.
        deadline = asyncio.get_running_loop().time() + 90
        while not (out := await broker.qry("ListWorkQueues", work_pool_name="replicated"))["ok"]:
            assert out["error"]["code"] == "unavailable", out
            assert asyncio.get_running_loop().time() < deadline, "the read model did not catch up within 90 s"
        queues = out["result"]
        assert {q["name"] for q in queues} == ({"default"} | {f"before-{i}" for i in range(10)}
                                              | {f"after-{i}" for i in range(10)})
        await assert_live_equals_rebuild(service, settings)

        # `runledger status` shows how the log is copied: the dead node's copy is not current.
        from runledger.cli.main import _register, app
        _register()
        env = cli_env(settings)
        result = await asyncio.to_thread(CliRunner().invoke, app, ["status", "--json"], env=env)
        assert result.exit_code == 0, result.output
        copies = json.loads(result.stdout)["replication"]
        assert copies["replicas"] == 3 and copies["leader"] not in (None, leader), copies
        peers = {peer["name"]: peer for peer in copies["peers"]}
        assert set(peers) | {copies["leader"]} == {node.server_name for node in cluster.nodes}, copies
        assert not peers[leader]["current"], copies
        result = await asyncio.to_thread(CliRunner().invoke, app, ["status"], env=env)
        assert f"event log: 3 replicas, led by {copies['leader']}; " in result.stdout, result.output
    finally:
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
        await service.stop()
        await drop_service_schema(settings)
        cluster.stop()


async def test_task_runs_run_once_each_when_their_task_streams_leader_dies(settings, tmp_path):
    cluster = EmbeddedNatsCluster(tmp_path / "cluster", size=3).start()
    settings = settings.model_copy(update={"nats_url": cluster.url, "stream_replicas": 3})
    service = Service(settings, roles=frozenset({"commands", "queries", "projections", "task_recovery"}))
    seen: collections.Counter[int] = collections.Counter()
    tasks = 600

    async def work(i: int) -> int:
        seen[i] += 1
        await asyncio.sleep(0.01)
        return i

    client = None
    try:
        await service.start()
        async with task_workers(settings, {"work": work}, 3):
            client = await RunledgerClient(settings).connect()
            ids: list[uuid.UUID] = []
            submitting = asyncio.create_task(submit_flow(client, tasks, ids))
            while len(ids) < tasks // 4:
                await asyncio.sleep(0.05)
            js = client._nc.jetstream()
            _kill(cluster, (await js.stream_info(task_stream_name(settings, "scheduled"))).cluster.leader)

            await asyncio.wait_for(submitting, 120)
            assert len(ids) == tasks
            await wait_all_finished(client, ids, 120)
            await assert_each_ran_once(client, settings, ids, seen)
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()
        await service.stop()
        await drop_service_schema(settings)
        cluster.stop()


def _route_names(node: EmbeddedNats) -> set[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.monitor_port}/routez", timeout=5) as response:
        return {route.get("remote_name") for route in json.load(response)["routes"]}


def _route_tls(tmp_path) -> broker_auth.RouteTLS:
    """A throw-away CA and one certificate for 127.0.0.1 that every node presents (trustme)."""
    import trustme

    ca = trustme.CA()
    node = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    node.cert_chain_pems[0].write_to_path(str(tmp_path / "node.pem"))
    node.private_key_pem.write_to_path(str(tmp_path / "node.key"))
    return broker_auth.RouteTLS(str(tmp_path / "node.pem"), str(tmp_path / "node.key"), str(tmp_path / "ca.pem"))


@pytest.mark.parametrize("tls", [False, True], ids=["password", "password-and-tls"])
async def test_a_cluster_from_broker_config_lets_in_its_nodes_and_nobody_else(settings, tmp_path, tls):
    creds = broker_auth.local_credentials(tmp_path)
    cluster = EmbeddedNatsCluster(tmp_path / "cluster", size=3, namespace=settings.namespace, credentials=creds,
                                  route_tls=_route_tls(tmp_path) if tls else None)
    cluster.start()
    intruder = None
    try:
        # The nodes found each other through their authenticated routes (JetStream answers).
        assert _route_names(cluster.nodes[0]) == {"runledger-node1", "runledger-node2"}
        # The admin makes the stream (the service's role may not), the service reads it.
        admin, service = (settings.model_copy(update={
            "nats_url": cluster.url, "stream_replicas": 3, "nats_user": creds[role]["user"],
            "nats_password": pydantic.SecretStr(creds[role]["password"]),
            "inbox_prefix": broker_auth.inbox_prefix(role)}) for role in ("admin", "service"))
        assert await set_up_broker(admin, change=True)
        nc = await connect(service)
        try:
            assert await ensure_broker(nc.jetstream(), service, change=False) == []
            info = await nc.jetstream().stream_info(service.stream_name)
            assert info.config.num_replicas == 3 and len(info.cluster.replicas) == 2
        finally:
            await nc.close()

        # A server that knows the route port but not the password is refused; with TLS, one
        # that knows the password but has no certificate too.
        route_port = cluster.route_ports[0]
        password = f"route:{cluster.route_password}@" if tls else ""
        intruder = EmbeddedNats(tmp_path / "intruder", server_name="intruder", extra_args=[
            "--cluster_name", "runledger", "--cluster", f"nats://127.0.0.1:{free_port()}",
            "--routes", f"nats://{password}127.0.0.1:{route_port}"]).start()
        await asyncio.sleep(3)
        assert "intruder" not in _route_names(cluster.nodes[0])
        log = (tmp_path / "cluster" / "node0" / "nats-server.log").read_text().lower()
        said = ("tls handshake failure", "tls route handshake error") if tls else ("authentication error",)
        assert any(s in log for s in said), log[-2000:]
    finally:
        if intruder is not None:
            intruder.stop()
        cluster.stop()

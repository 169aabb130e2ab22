"""The broker roles (infra/broker_auth.py) against a nats-server running the generated
configuration: each role can do its work, and none can touch what is not its own. nats-py does
not raise on a refused publish or subscription; the server's `Permissions Violation` reaches the
error callback, so each refusal is asserted there and by its effect (the stream's message
count, the snapshot bucket, the service's consumer)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shutil
import uuid

import nats
import nats.errors
import pytest
from nats.js.errors import NotFoundError

from runledger.cli.broker_config import set_up_broker
from runledger.infra import broker_auth
from runledger.infra.embedded import EmbeddedNats
from runledger.infra.event_store import EventStore
from runledger.infra.jetstream_setup import ensure_broker, ensure_event_stream
from runledger.infra.nats_connection import BrokerUnavailable, connect
from runledger.infra.settings import Settings
from runledger.projections.replay import iter_log

from .broker import Broker

# The name of a connection that makes refused requests with the service's credentials on
# purpose; the refusals of every other connection of the service fail the test.
REFUSALS_EXPECTED = "refusals-expected"
# Every projection's durable consumer: the service's alone.
CONSUMERS = broker_auth.service_consumer_names()


class Roles:
    def __init__(self, server: EmbeddedNats, database_url: str, namespace: str, creds: dict):
        self.server, self.database_url, self.namespace, self.creds = server, database_url, namespace, creds
        self.connections: list = []

    def settings(self, role: str) -> Settings:
        return Settings(nats_url=self.server.url, database_url=self.database_url, namespace=self.namespace,
                        nats_user=self.creds[role]["user"], nats_password=self.creds[role]["password"],
                        inbox_prefix=broker_auth.inbox_prefix(role), request_timeout=3.0,
                        js_api_prefix=self.creds[role].get("js_api_prefix", "$JS.API"))

    async def connect(self, role: str, name: str | None = None):
        """A raw connection as `role` (named `name` in the server's log) and the errors its
        callback receives."""
        errors: list[str] = []

        async def on_error(e: Exception) -> None:
            errors.append(str(e))

        nc = await nats.connect(self.server.url, user=self.creds[role]["user"], password=self.creds[role]["password"],
                                inbox_prefix=broker_auth.inbox_prefix(role), error_cb=on_error,
                                allow_reconnect=False, connect_timeout=3, name=name)
        self.connections.append(nc)
        return nc, errors

    def admin_settings(self, settings: Settings) -> Settings:
        """`settings` (the service's: its stream settings) with the admin's credentials."""
        admin = self.settings("admin")
        return settings.model_copy(update={"nats_user": admin.nats_user, "nats_password": admin.nats_password,
                                           "inbox_prefix": admin.inbox_prefix})

    @property
    def stream(self) -> str:
        return f"{self.namespace.upper()}_EVENTS"

    @property
    def snapshots(self) -> str:
        return f"{self.namespace.upper()}_SNAPSHOTS"

    @property
    def leases(self) -> str:
        return f"{self.namespace.upper()}_LEASES"

    @property
    def task_streams(self) -> tuple[str, str]:
        return broker_auth.Names(self.namespace).task_streams

    def violations(self, user: str) -> list[str]:
        """The server's log lines of refused publishes and subscriptions by `user`."""
        log = (self.server.store_dir / "nats-server.log").read_text(errors="replace")
        return [line for line in log.splitlines() if "Violation" in line and f'user:{user}"' in line]


@contextlib.asynccontextmanager
async def roles_served(server_urls, tmp_path, task_worker_keys=None, **service_settings):
    """A nats-server configured as `runledger up` configures it (with `task_worker_keys`: task
    workers bound to keys) and a service beside it; its log is checked afterwards: the
    service's own work needs nothing its role lacks (only a test's connection named
    REFUSALS_EXPECTED may be refused)."""
    from runledger.handlers.service import Service
    from runledger.infra.database import create_engine, drop_schema

    namespace = f"r{uuid.uuid4().hex[:12]}"
    creds = broker_auth.local_credentials(tmp_path, task_worker_keys)
    config = broker_auth.write_local_config(tmp_path, namespace, creds, tmp_path / "nats")
    server = EmbeddedNats(tmp_path / "nats", config_file=config).start()
    r = Roles(server, server_urls["database_url"], namespace, creds)
    settings = r.settings("service").model_copy(update={"task_worker_keys": task_worker_keys or {},
                                                          **service_settings})
    service = Service(settings)
    try:
        # As `runledger broker-setup` (and `up`) do: the service's own credentials make no stream.
        assert await set_up_broker(r.admin_settings(settings), change=True)
        await service.start()
        yield r
    finally:
        for nc in r.connections:
            if not nc.is_closed:
                await nc.close()
        await service.stop()
        engine = create_engine(settings)
        await drop_schema(engine, namespace)
        await engine.dispose()
        server.stop()
        log = (tmp_path / "nats" / "nats-server.log").read_text(errors="replace")
        shutil.rmtree(tmp_path / "nats", ignore_errors=True)
    refused = [line for line in log.splitlines() if "Violation" in line and '/user:service"' in line
               and f':{REFUSALS_EXPECTED}"' not in line]
    assert not refused, refused


@pytest.fixture
async def roles(server_urls, tmp_path):
    async with roles_served(server_urls, tmp_path) as r:
        yield r


async def _pool(r: Roles) -> dict:
    nc, _ = await r.connect("client")
    broker = Broker(nc, r.settings("client"))
    created = await broker.cmd("CreateWorkPool", name=f"p{uuid.uuid4().hex[:6]}", type="process")
    assert created["ok"], created
    await broker.ok_qry("GetWorkPool", name=created["result"]["name"])  # projected
    return created["result"]


async def _state(r: Roles) -> tuple[int, int, bool]:
    """(event stream messages, snapshot bucket messages, projection consumer exists)."""
    nc, _ = await r.connect("service")
    js = nc.jetstream()
    events = (await js.stream_info(r.stream)).state.messages
    try:
        kv = (await js.stream_info(f"KV_{r.snapshots}")).state.messages
    except NotFoundError:
        kv = 0
    try:
        for name in CONSUMERS:
            await js.consumer_info(r.stream, name)
        consumer = True
    except NotFoundError:
        consumer = False
    await nc.close()
    return events, kv, consumer


def _attacks(r: Roles, pool_id: str) -> dict[str, tuple[str, bytes, dict | None]]:
    """Subject, body and headers of each forbidden publish."""
    ns, stream = r.namespace, r.stream
    envelope = json.dumps({"id": str(uuid.uuid4()), "type": "WorkPoolUpdated", "aggregate_type": "work_pool",
                           "aggregate_id": pool_id, "data": {"paused": True}}).encode()
    return {
        "forge an event": (f"{ns}.evt.work_pool.{pool_id}.WorkPoolUpdated", envelope, None),
        "forge an idempotency record": (f"{ns}.idem.{'0' * 40}", b'{"ok":true}', None),
        "write a snapshot": (f"$KV.{r.snapshots}.work_pool.{pool_id}", b'{"v":1,"seq":1,"state":{}}', None),
        "open a batch": (f"{ns}.evt.work_pool.{pool_id}.WorkPoolDeleted", envelope,
                         {"Nats-Batch-Id": uuid.uuid4().hex, "Nats-Batch-Sequence": "1"}),
        "purge the stream": (f"$JS.API.STREAM.PURGE.{stream}", b"", None),
        "delete the stream": (f"$JS.API.STREAM.DELETE.{stream}", b"", None),
        "delete a message": (f"$JS.API.STREAM.MSG.DELETE.{stream}", b'{"seq":1}', None),
        **{f"delete the service's consumer {c}": (f"$JS.API.CONSUMER.DELETE.{stream}.{c}", b"", None)
           for c in CONSUMERS},
        **{f"ack for the service's consumer {c}": (f"$JS.ACK.{stream}.{c}.1.1.1.0.0", b"", None)
           for c in CONSUMERS},
    }


async def _assert_refused(r: Roles, role: str, pool_id: str, extra: dict | None = None) -> None:
    before = await _state(r)
    nc, errors = await r.connect(role)
    attacks = {**_attacks(r, pool_id), **(extra or {})}
    for subject, body, headers in attacks.values():
        await nc.publish(subject, body, headers=headers, reply=nc.new_inbox())
    await nc.flush()
    await asyncio.sleep(0.3)
    for what, (subject, _, _) in attacks.items():
        # nats-py hands the server's message over in lower case
        assert any(f'permissions violation for publish to "{subject.lower()}"' in e.lower() for e in errors), (what, errors)
    assert await _state(r) == before
    assert not nc.is_closed


async def _assert_cannot_subscribe(r: Roles, role: str, subjects: list[str]) -> None:
    nc, errors = await r.connect(role)
    for subject in subjects:
        await nc.subscribe(subject)
    await nc.flush()
    await asyncio.sleep(0.2)
    for subject in subjects:
        assert any(f'permissions violation for subscription to "{subject.lower()}"' in e.lower() for e in errors), (subject, errors)


async def test_unauthenticated_and_wrong_password_are_refused(roles):
    with pytest.raises(nats.errors.Error):
        await nats.connect(roles.server.url, allow_reconnect=False, connect_timeout=3)
    with pytest.raises(nats.errors.Error):
        await nats.connect(roles.server.url, user="client", password="wrong", allow_reconnect=False,
                           connect_timeout=3)
    anonymous = Settings(nats_url=roles.server.url, namespace=roles.namespace)
    with pytest.raises(BrokerUnavailable, match="authorization violation"):
        await connect(anonymous, wait_for_server=False)


async def test_client_round_trip_and_nothing_else(roles):
    pool = await _pool(roles)  # a command and a query with client credentials
    stream = roles.stream
    await _assert_refused(roles, "client", pool["id"], {
        "read the log": (f"$JS.API.DIRECT.GET.{stream}", b'{"seq":1}', None),
        "stream info": (f"$JS.API.STREAM.INFO.{stream}", b"", None),
    })
    await _assert_cannot_subscribe(roles, "client", ["_INBOX.service.>", "_INBOX.analyst.>", "_INBOX.>",
                                                     f"{roles.namespace}.cmd.>", f"{roles.namespace}.evt.>"])


async def test_only_clients_poll_for_their_deployments_runs(roles):
    """The runner poll and its record are a client's, as the pool poll is: the analyst and the
    task worker may neither ask it nor forge its record. The record itself is a command the
    service sends itself, as its scheduler, clock and foreman do: with the broker's
    permissions it arrives (and `roles_served` finds no refused publish of the service's)."""
    nc, _ = await roles.connect("client")
    broker = Broker(nc, roles.settings("client"))
    flow = await broker.ok_cmd("CreateFlow", name="etl")
    deployment = await broker.ok_cmd("CreateDeployment", name="d", flow_id=flow["id"])
    await broker.ok_qry("GetDeployment", id=deployment["id"])  # projected
    assert await broker.ok_qry("GetScheduledFlowRunsForDeployments", deployment_ids=[deployment["id"]]) == []
    for _ in range(100):  # the poll's record is sent in the background
        if (await broker.ok_qry("GetDeployment", id=deployment["id"]))["status"] == "READY":
            break
        await asyncio.sleep(0.05)
    assert (await broker.ok_qry("GetDeployment", id=deployment["id"]))["status"] == "READY"
    body = json.dumps({"deployment_ids": [str(uuid.uuid4())]}).encode()
    ns = roles.namespace
    for role in ("analyst", "task_worker"):
        before = await _state(roles)
        nc, errors = await roles.connect(role)
        refused = [f"{ns}.qry.GetScheduledFlowRunsForDeployments", f"{ns}.cmd.RecordDeploymentsPolled",
                   f"{ns}.cmd.MarkQueuelessDeploymentsNotReady"]
        for subject in refused:
            await nc.publish(subject, body, reply=nc.new_inbox())
        await nc.flush()
        await asyncio.sleep(0.3)
        for subject in refused:
            assert any(f'permissions violation for publish to "{subject.lower()}"' in e.lower() for e in errors), \
                (role, subject, errors)
        assert await _state(roles) == before


async def test_analyst_reads_the_log_as_events_and_replay_do(roles):
    pool = await _pool(roles)
    settings = roles.settings("analyst")
    nc = await connect(settings, name="analyst", wait_for_server=False)
    roles.connections.append(nc)
    await ensure_event_stream(nc.jetstream(prefix=settings.js_api_prefix), settings)  # as `replay` does
    store = EventStore(nc, settings)
    last = await store.last_sequence()
    read = [e async for batch in iter_log(store, f"{settings.event_subject_prefix}.*.*.*") for e in batch]
    assert read and read[-1].seq <= last
    assert any(e.subject.startswith(f"{settings.event_subject_prefix}.work_pool.{pool['id']}.") for e in read)
    events = await store.read_aggregate("work_pool", pool["id"])
    assert events and events[0].envelope.type == "WorkPoolCreated"
    assert (await store.last_event("work_pool", pool["id"])) is not None
    assert (await _state(roles))[2]  # the service's consumer is untouched


async def test_analyst_cannot_write_or_take_over_the_services_consumers(roles):
    pool = await _pool(roles)
    stream = roles.stream
    attacks = {}
    for api in ("$JS.API", broker_auth.ANALYST_JS_API):  # its own account's, and the imported read API
        for c in CONSUMERS:  # every projection's consumer
            take_over = json.dumps({"stream_name": stream, "config": {
                "name": c, "ack_policy": "none", "deliver_policy": "all", "inactive_threshold": 1}})
            attacks |= {
                f"{api}: update the service's consumer {c}": (f"{api}.CONSUMER.CREATE.{stream}.{c}",
                                                              take_over.encode(), None),
                f"{api}: create {c} named in the body": (f"{api}.CONSUMER.CREATE.{stream}", take_over.encode(),
                                                         None),
                f"{api}: pull the service's consumer {c}": (f"{api}.CONSUMER.MSG.NEXT.{stream}.{c}",
                                                            b'{"batch":1}', None),
                f"{api}: delete the service's consumer {c}": (f"{api}.CONSUMER.DELETE.{stream}.{c}",
                                                              b"", None),
            }
        attacks |= {
            f"{api}: create a durable": (f"{api}.CONSUMER.DURABLE.CREATE.{stream}.x", b"{}", None),
            f"{api}: purge": (f"{api}.STREAM.PURGE.{stream}", b"", None),
            f"{api}: update the stream": (f"{api}.STREAM.UPDATE.{stream}", b"{}", None),
            f"{api}: read a bucket": (f"{api}.DIRECT.GET.KV_{roles.snapshots}", b'{"seq":1}', None),
        }
    await _assert_refused(roles, "analyst", pool["id"], attacks)
    await _assert_cannot_subscribe(roles, "analyst", ["_INBOX.client.>", "_INBOX.service.>",
                                                      f"{roles.namespace}.qry.>"])


async def test_service_cannot_purge_or_delete_the_log(roles):
    await _pool(roles)
    before = await _state(roles)
    nc, errors = await roles.connect("service", REFUSALS_EXPECTED)
    for subject in (f"$JS.API.STREAM.PURGE.{roles.stream}", f"$JS.API.STREAM.DELETE.{roles.stream}"):
        await nc.publish(subject, b"", reply=nc.new_inbox())
    await nc.flush()
    await asyncio.sleep(0.3)
    assert sum("permissions violation" in e.lower() for e in errors) == 2, errors
    assert await _state(roles) == before


async def _stream_config_and_count(r: Roles) -> tuple[dict, int]:
    nc, _ = await r.connect("service")
    info = await nc.jetstream().stream_info(r.stream)
    await nc.close()
    return info.config.as_dict(), info.state.messages


async def test_the_services_credentials_can_neither_shrink_the_log_nor_make_a_stream(roles):
    """The audit's attack: with the service's password, `max_msgs=1, discard=old` erased all but
    the last event. Stream updates and creations are the admin's now: refused, nothing changed."""
    await _pool(roles)
    await _pool(roles)  # events enough for a shrink to erase some
    before = await _stream_config_and_count(roles)
    assert before[1] >= 2
    nc, errors = await roles.connect("service", REFUSALS_EXPECTED)  # not `_assert_refused`: the service may append
    streams = (await nc.jetstream().account_info()).streams
    shrunk = {**before[0], "max_msgs": 1, "discard": "old"}
    other = f"{roles.namespace.upper()}_OTHER"
    attacks = {
        "shrink the log": (f"$JS.API.STREAM.UPDATE.{roles.stream}", json.dumps(shrunk).encode(), None),
        "make a stream": (f"$JS.API.STREAM.CREATE.{other}",
                          json.dumps({"name": other, "subjects": [f"{roles.namespace}.other.>"]}).encode(), None),
        **{f"update {s}": (f"$JS.API.STREAM.UPDATE.{s}", b"{}", None)
           for s in (*roles.task_streams, f"KV_{roles.snapshots}", f"KV_{roles.leases}",
                     f"KV_{broker_auth.Names(roles.namespace).buckets[2]}", broker_auth.Names(roles.namespace).result_stream)},
    }
    for subject, body, _ in attacks.values():
        await nc.publish(subject, body, reply=nc.new_inbox())
    await nc.flush()
    await asyncio.sleep(0.3)
    for what, (subject, _, _) in attacks.items():
        assert any(f'permissions violation for publish to "{subject.lower()}"' in e.lower() for e in errors), (what, errors)
    assert await _stream_config_and_count(roles) == before
    assert (await nc.jetstream().account_info()).streams == streams  # no other stream


async def test_no_other_role_can_use_the_admins_subjects(roles):
    pool = await _pool(roles)
    ns, stream = roles.namespace, roles.stream
    streams = (stream, *roles.task_streams, f"KV_{roles.snapshots}")
    for role, apis in (("client", ["$JS.API"]), ("analyst", ["$JS.API", broker_auth.ANALYST_JS_API]),
                       ("task_worker", ["$JS.API", broker_auth.TASK_WORKER_JS_API])):
        attacks = {f"{api}: {op} {s}": (f"{api}.STREAM.{op}.{s}", b"{}", None)
                   for api in apis for s in streams for op in ("CREATE", "UPDATE")}
        attacks |= {f"{api}: account info": (f"{api}.INFO", b"", None) for api in apis}
        attacks[f"{apis[0]}: make a stream"] = (f"{apis[0]}.STREAM.CREATE.{ns.upper()}_OTHER", b"{}", None)
        await _assert_refused(roles, role, pool["id"], attacks)
        await _assert_cannot_subscribe(roles, role, ["_INBOX.admin.>"])


async def test_the_admin_sets_up_and_upgrades_and_cannot_erase_or_write_the_log(roles):
    """The admin made every stream and bucket (`roles_served`); it upgrades an outdated one,
    and reaches nothing else: no purge or delete of the log, no event, no key, no consumer."""
    pool = await _pool(roles)
    service = roles.settings("service")
    admin = roles.admin_settings(service)
    nc = await connect(admin, name="admin", wait_for_server=False)
    roles.connections.append(nc)
    js = nc.jetstream()
    assert await ensure_broker(js, service, change=False) == []  # set up already
    current = (await js.stream_info(roles.stream)).config
    await js.update_stream(dataclasses.replace(current, duplicate_window=current.duplicate_window / 2))
    assert await ensure_broker(js, service, change=False) == [f"stream {roles.stream} outdated: duplicate_window"]
    assert await ensure_broker(js, service, change=True) == [f"upgraded stream {roles.stream}: duplicate_window"]
    assert (await js.stream_info(roles.stream)).config.duplicate_window == current.duplicate_window
    await _assert_refused(roles, "admin", pool["id"], {
        "a command": (f"{roles.namespace}.cmd.CreateWorkPool", b'{"name":"x","type":"process"}', None),
        "a query": (f"{roles.namespace}.qry.ListWorkPools", b"{}", None),
        "read the log": (f"$JS.API.DIRECT.GET.{roles.stream}", b'{"seq":1}', None),
        "a consumer of the log": (f"$JS.API.CONSUMER.CREATE.{roles.stream}.x", b"{}", None),
        "purge a bucket": (f"$JS.API.STREAM.PURGE.KV_{roles.leases}", b"", None),
        "delete a task stream": (f"$JS.API.STREAM.DELETE.{roles.task_streams[0]}", b"", None),
        "put a task run": (f"{roles.namespace}.task.k.scheduled", b"{}", None),
    })
    await _assert_cannot_subscribe(roles, "admin", ["_INBOX.service.>", "_INBOX.client.>", f"{roles.namespace}.cmd.>",
                                                    f"{roles.namespace}.evt.>"])


async def test_analyst_cannot_have_the_server_write_into_the_log(roles):
    """JetStream answers on whatever reply subject a request names, unchecked. In one account
    with the log that would let the analyst have answers stored in it; from its own account,
    through the imports, the answers land on its account's subjects."""
    pool = await _pool(roles)
    before = await _state(roles)
    nc, _ = await roles.connect("analyst")
    read = broker_auth.ANALYST_JS_API
    into = [f"{roles.namespace}.evt.work_pool.{pool['id']}.WorkPoolUpdated", f"{roles.namespace}.idem.{'1' * 40}",
            f"$KV.{roles.snapshots}.work_pool.{pool['id']}"]
    for reply in into:
        await nc.publish(f"{read}.STREAM.INFO.{roles.stream}", b"", reply=reply)
        await nc.publish(f"{read}.DIRECT.GET.{roles.stream}", b'{"seq":1}', reply=reply)
    await nc.flush()
    await asyncio.sleep(0.3)
    assert await _state(roles) == before
    # An acknowledgement subject (kept as it is across an import) is refused as a reply subject.
    nc, errors = await roles.connect("analyst")
    forged_ack = f"$JS.ACK.{roles.stream}.{CONSUMERS[0]}.1.1.1.0.0"
    await nc.publish(f"{read}.STREAM.INFO.{roles.stream}", b"", reply=forged_ack)
    await nc.flush()
    await asyncio.sleep(0.3)
    assert any(f'permissions violation for publish with reply of "{forged_ack.lower()}"' in e.lower()
               for e in errors), errors


async def test_a_push_consumer_of_the_analyst_delivers_nothing_into_a_bucket(roles):
    """The server does not check a push consumer's deliver subject against its creator's
    permissions; it delivers only where a client subscribed, and a bucket's stream is not one.
    Should that change, this fails (docs/security.md)."""
    await _pool(roles)
    nc, _ = await roles.connect("analyst")
    js = nc.jetstream(prefix=broker_auth.ANALYST_JS_API)
    before = await _state(roles)
    config = {"stream_name": roles.stream, "config": {
        "name": "push", "deliver_subject": f"$KV.{roles.snapshots}.forged", "ack_policy": "none",
        "deliver_policy": "all"}}
    await nc.request(f"{broker_auth.ANALYST_JS_API}.CONSUMER.CREATE.{roles.stream}.push", json.dumps(config).encode(),
                     timeout=3)
    await asyncio.sleep(0.5)
    with contextlib.suppress(Exception):
        await js.delete_consumer(roles.stream, "push")
    assert await _state(roles) == before


async def test_analyst_and_client_may_read_events_and_the_analyst_nothing_else(roles):
    """`ReadEvents` is read-only and answered from the log: the client sends it like any query,
    the analyst through its account's import of that one query subject. Every other query and
    every command stays closed to the analyst."""
    from runledger.client import RunledgerClient
    from runledger.client.errors import Unavailable

    pool = await _pool(roles)
    for role in ("client", "analyst"):
        async with RunledgerClient(roles.settings(role)) as rl:
            page = await rl.read_events(aggregate_type="work_pool", aggregate_id=pool["id"])
            assert [e["type"] for e in page.events] == ["WorkPoolCreated"], role
            prefect = await rl.read_events(resource_id=f"prefect.work-pool.{pool['id']}", vocabulary="prefect",
                                           prefect_event_prefix="prefect.work-pool.created")
            assert [e["event"] for e in prefect.events] == ["prefect.work-pool.created"], role
    ns = roles.namespace
    before = await _state(roles)
    nc, errors = await roles.connect("analyst")
    refused = [f"{ns}.qry.GetWorkPool", f"{ns}.qry.GetServiceHealth", f"{ns}.qry.GetWorkQueueStatus",
               f"{ns}.cmd.CreateWorkPool", f"{ns}.cmd.DeleteWorkPool", f"{ns}.cmd.SetTaskRunStates", f"{ns}.cmd.MarkFlowRunLate",
               f"{ns}.cmd.DeleteRunOfDeletedDeployment", f"{ns}.cmd.RenewDeploymentSlotLease",
               f"{ns}.cmd.DeleteFinishedFlowRun", f"{ns}.cmd.DeleteFinishedTaskRun",
               f"{ns}.qry.ReadEventsX"]
    for subject in refused:
        await nc.publish(subject, json.dumps({"name": pool["name"]}).encode(), reply=nc.new_inbox())
    await nc.flush()
    await asyncio.sleep(0.3)
    for subject in refused:
        assert any(f'permissions violation for publish to "{subject.lower()}"' in e.lower() for e in errors), (subject, errors)
    assert await _state(roles) == before
    async with RunledgerClient(roles.settings("analyst"), retries=0) as rl:  # the client sees no responder
        with pytest.raises(Unavailable):
            await rl.query("GetWorkPool", {"name": pool["name"]}, min_seq=0)


async def test_task_worker_serves_its_keys_and_submits_tasks_with_its_own_credentials(roles):
    """The task-worker role runs the whole loop from its own account, through its imports:
    creates and reads its keys' consumers, takes a run, reports it, awaits a run another
    client submitted (reading it, catching up with the service, hearing it finish) and one it
    submitted itself; the client hears that a run finished. None of it is refused."""
    from runledger.client import RunledgerClient
    from runledger.client.tasks import (
        fetch_task_result,
        submit_task,
        submit_tasks,
        task_result,
        wait_for_task_run,
    )
    from runledger.handlers.task_worker import TaskWorker

    worker_settings = roles.settings("task_worker")
    assert worker_settings.js_api_prefix == broker_auth.TASK_WORKER_JS_API  # from its credentials
    nc = await connect(worker_settings, name="task-worker", wait_for_server=False)
    roles.connections.append(nc)
    gate = asyncio.Event()

    async def double(x: int) -> int:
        return 2 * x

    async def gated() -> str:
        await gate.wait()
        return "opened"

    async def big() -> str:  # stored apart, in chunks, through its imports
        return "y" * 700_000

    worker = TaskWorker(nc, worker_settings, {"double": double, "gated": gated, "big": big})
    await worker.start()
    stop = asyncio.Event()
    serving = asyncio.create_task(worker.serve(stop))
    try:
        async with RunledgerClient(roles.settings("client")) as client:
            run = await submit_task(client, "double", {"x": 21})
            assert task_result(await wait_for_task_run(client, run.id, timeout=10)) == 42
            # Its heartbeat went into the workers-present bucket with its own credentials.
            assert [w.identifier for w in await client.read_task_workers(["double"])] == [worker.worker_id]
            held = await submit_task(client, "gated", {})  # runs until the gate opens
        async with RunledgerClient(worker_settings) as as_worker:  # a task may submit and await others
            # A run someone else submitted, not finished yet: the wait reads it, catches up with
            # the service (`GetServiceHealth`) and reads it again, then hears that it finished.
            waiting = asyncio.create_task(wait_for_task_run(as_worker, held.id, timeout=15))
            await asyncio.sleep(0.5)
            assert not waiting.done()
            gate.set()
            assert task_result(await waiting) == "opened"
            assert isinstance(await as_worker.catch_up(), int)
            run = await submit_task(as_worker, "double", {"x": 5})
            assert task_result(await wait_for_task_run(as_worker, run.id, timeout=10)) == 10
            mapped = await submit_tasks(as_worker, "double", [{"x": 6}, {"x": 7}])  # in one request
            assert [task_result(await wait_for_task_run(as_worker, i, timeout=10)) for i in mapped] == [12, 14]
            # Many reports in one request (a busy worker's): through its import too.
            unknown = [{"id": str(uuid.uuid4()), "state": {"type": "RUNNING"}} for _ in range(2)]
            reports = await as_worker.command("SetTaskRunStates", {"states": unknown})
            assert [item["error"]["code"] for item in reports.result] == ["not_found", "not_found"]
            large = await submit_task(as_worker, "big", {})
            assert await fetch_task_result(as_worker, await wait_for_task_run(as_worker, large.id, timeout=10)) == \
                "y" * 700_000
        async with RunledgerClient(roles.settings("client")) as client:  # a client reads it too
            assert await fetch_task_result(client, await wait_for_task_run(client, large.id, timeout=10)) == \
                "y" * 700_000
    finally:
        gate.set()
        stop.set()
        await asyncio.wait_for(serving, 10)
    assert not roles.violations("task_worker")


async def test_a_push_consumer_of_the_task_worker_delivers_nothing_into_the_log(roles):
    """As the analyst's (above): a push consumer it creates on a task stream, delivering into
    the log, takes a run queued on its filter and delivers nothing there."""
    from runledger.client import RunledgerClient
    from runledger.client.tasks import submit_task

    pool = await _pool(roles)
    ns, tasks = roles.namespace, roles.task_streams[0]
    nc, _ = await roles.connect("task_worker")
    into = f"{ns}.evt.work_pool.{pool['id']}.WorkPoolDeleted"
    config = {"stream_name": tasks, "config": {
        "name": "push", "deliver_subject": into, "ack_policy": "explicit", "deliver_policy": "all",
        "filter_subject": f"{ns}.task.p.scheduled"}}
    created = await nc.request(f"{broker_auth.TASK_WORKER_JS_API}.CONSUMER.CREATE.{tasks}.push.{ns}.task.p.scheduled",
                               json.dumps(config).encode(), timeout=3)
    assert "error" not in json.loads(created.data), created.data
    async with RunledgerClient(roles.settings("client")) as client:
        await submit_task(client, "p", {})
    await asyncio.sleep(0.5)
    service, _ = await roles.connect("service")
    pool_subjects = (await service.jetstream().stream_info(roles.stream, subjects_filter=f"{ns}.evt.work_pool.{pool['id']}.>")
                     ).state.subjects
    assert pool_subjects == {f"{ns}.evt.work_pool.{pool['id']}.WorkPoolCreated": 1}, pool_subjects


async def test_task_worker_cannot_touch_the_log_other_commands_or_queries(roles):
    pool = await _pool(roles)
    ns, stream = roles.namespace, roles.stream
    tasks = roles.task_streams[0]
    attacks = {
        "another command": (f"{ns}.cmd.DeleteWorkPool", json.dumps({"name": pool["name"]}).encode(), None),
        "the clock's command": (f"{ns}.cmd.MarkFlowRunLate", json.dumps({"id": str(uuid.uuid4())}).encode(), None),
        "the foreman's command": (f"{ns}.cmd.DeleteRunOfDeletedDeployment",
                                  json.dumps({"id": str(uuid.uuid4()), "deployment_id": str(uuid.uuid4())}).encode(),
                                  None),
        "keep a flow run's deployment slot": (f"{ns}.cmd.RenewDeploymentSlotLease",
                                              json.dumps({"id": str(uuid.uuid4())}).encode(), None),
        "the vacuum's command": (f"{ns}.cmd.DeleteFinishedFlowRun",
                                 json.dumps({"id": str(uuid.uuid4()), "ended_before": "2026-01-01T00:00:00Z"}).encode(),
                                 None),
        "another query": (f"{ns}.qry.ListWorkPools", b"{}", None),
        "a queue's health": (f"{ns}.qry.GetWorkQueueStatus", b"{}", None),
        "the analyst's query": (f"{ns}.qry.ReadEvents", b"{}", None),
        "publish onto a task key itself": (f"{ns}.task.k.scheduled", b"{}", None),
        "forge a finish notice": (f"{ns}.taskrun.finished.{uuid.uuid4()}", b"{}", None),
        "forge a cancel notice": (f"{ns}.taskrun.cancel.k.{uuid.uuid4()}", b"{}", None),
        "forge a tag-freed notice": (f"{ns}.taskrun.tagfreed.db", b'{"tag":"db","freed":1}', None),
        "write a lease": (f"$KV.{roles.leases}.projection.x", b"{}", None),
    }
    # Its account's own JetStream API (none: it is not enabled there), the service account's
    # under the usual prefix, and what its imports do not cover under its own.
    for api in ("$JS.API", broker_auth.TASK_WORKER_JS_API):
        attacks |= {
            f"{api}: read the log": (f"{api}.DIRECT.GET.{stream}", b'{"seq":1}', None),
            f"{api}: stream info": (f"{api}.STREAM.INFO.{stream}", b"", None),
            f"{api}: a consumer of the log": (f"{api}.CONSUMER.CREATE.{stream}.x.{ns}.evt.>", b"{}", None),
            f"{api}: pull the service's consumer": (f"{api}.CONSUMER.MSG.NEXT.{stream}.{CONSUMERS[0]}",
                                                    b'{"batch":1}', None),
            f"{api}: delete a task stream": (f"{api}.STREAM.DELETE.{tasks}", b"", None),
            f"{api}: purge a task stream": (f"{api}.STREAM.PURGE.{tasks}", b"", None),
            f"{api}: a task stream's info": (f"{api}.STREAM.INFO.{tasks}", b"", None),
            f"{api}: read a task stream": (f"{api}.DIRECT.GET.{tasks}", b'{"seq":1}', None),
            f"{api}: delete a task consumer": (f"{api}.CONSUMER.DELETE.{tasks}.task_scheduled_k", b"", None),
            f"{api}: a task consumer named in the body": (f"{api}.CONSUMER.CREATE.{tasks}", b"{}", None),
            f"{api}: a legacy durable task consumer": (f"{api}.CONSUMER.DURABLE.CREATE.{tasks}.x", b"{}", None),
            f"{api}: a snapshot bucket's info": (f"{api}.STREAM.INFO.KV_{roles.snapshots}", b"", None),
        }
    attacks["$JS.API: create a task consumer"] = (f"$JS.API.CONSUMER.CREATE.{tasks}.x.{ns}.task.k.scheduled",
                                                   b"{}", None)
    await _assert_refused(roles, "task_worker", pool["id"], attacks)
    await _assert_cannot_subscribe(roles, "task_worker", ["_INBOX.client.>", "_INBOX.service.>", "_INBOX.analyst.>",
                                                          "_INBOX.>", "_R_.>", f"{ns}.evt.>", f"{ns}.cmd.>",
                                                          f"{ns}.qry.>", f"{ns}.task.>"])


async def _task_streams_and_leases(r: Roles) -> tuple[int, int, int]:
    """(messages in each task stream, messages in the lease bucket)."""
    nc, _ = await r.connect("service")
    js = nc.jetstream()
    counts = [(await js.stream_info(s)).state.messages for s in r.task_streams]
    leases = (await js.stream_info(f"KV_{r.leases}")).state.messages
    await nc.close()
    return counts[0], counts[1], leases


async def test_task_worker_cannot_have_the_server_write_into_the_log(roles):
    """As for the analyst: JetStream (and the service) answer on whatever reply subject a
    request names. In the service's account that let a task worker have answers stored in the
    log, a bucket or a task stream; from its own account, through its imports, they come back
    on its account's subjects, where nothing is stored. Through `$JS.API` it sends nothing."""
    from runledger.client import RunledgerClient
    from runledger.client.tasks import submit_task
    from runledger.infra.task_queues import consumer_name, task_consumer_config

    pool = await _pool(roles)
    ns, (tasks, retries) = roles.namespace, roles.task_streams
    async with RunledgerClient(roles.settings("client")) as client:
        waiting = await submit_task(client, "k", {})  # a run no worker takes: something to fetch
    settings = roles.settings("task_worker")
    nc, errors = await roles.connect("task_worker")
    js = nc.jetstream(prefix=settings.js_api_prefix)
    for side, stream in (("scheduled", tasks), ("retry", retries)):  # as a worker binds its key
        await js.add_consumer(stream, task_consumer_config("k", side, settings))
    scheduled, retry = consumer_name("k", "scheduled"), consumer_name("k", "retry")
    before = await _state(roles), await _task_streams_and_leases(roles)
    assert before[1][0] == 1, before

    into = [f"{ns}.evt.work_pool.{pool['id']}.WorkPoolDeleted", f"{ns}.idem.{'2' * 40}",
            f"$KV.{roles.snapshots}.work_pool.{pool['id']}", f"$KV.{roles.leases}.forged",
            f"{ns}.task.x.scheduled", f"{ns}.task.x.retry"]
    refused = []
    for api in (broker_auth.TASK_WORKER_JS_API, "$JS.API"):
        requests = [
            (f"{api}.CONSUMER.INFO.{tasks}.{scheduled}", b""),
            (f"{api}.CONSUMER.INFO.{retries}.{retry}", b""),
            (f"{api}.CONSUMER.CREATE.{tasks}.{scheduled}.{ns}.task.k.scheduled",
             json.dumps({"stream_name": tasks, "config": task_consumer_config("k", "scheduled", settings).as_dict()}
                        ).encode()),
            (f"{api}.CONSUMER.MSG.NEXT.{retries}.{retry}", b'{"batch":1,"no_wait":true}'),  # an empty answer
            (f"{api}.CONSUMER.MSG.NEXT.{tasks}.{scheduled}", b'{"batch":1,"no_wait":true}'),  # the waiting run
        ]
        for subject, body in requests:
            for reply in into:
                await nc.publish(subject, body, reply=reply)
        if api == "$JS.API":
            refused += [subject for subject, _ in requests]
    for reply in into:  # its other imports: a heartbeat (a PubAck), a query, an acknowledgement
        await nc.publish(f"$KV.{broker_auth.Names(ns).buckets[2]}.probe", b"{}", reply=reply)
        await nc.publish(f"{ns}.qry.GetServiceHealth", b"{}", reply=reply)
        await nc.publish(f"{ns}.qry.GetTaskRun", json.dumps({"id": str(waiting.id)}).encode(), reply=reply)
        await nc.publish(f"$JS.ACK.{retries}.{retry}.1.999.999.0.0", b"", reply=reply)
    # An answer steered onto an acknowledgement subject of the service's consumers: the server
    # keeps a `$JS.ACK.` reply as it is across an import, and refuses one its sender may not
    # publish to (an empty answer would acknowledge for that consumer).
    forged_ack = f"$JS.ACK.{roles.stream}.{CONSUMERS[0]}.1.1.1.0.0"
    await nc.publish(f"{broker_auth.TASK_WORKER_JS_API}.CONSUMER.MSG.NEXT.{retries}.{retry}",
                     b'{"batch":1,"no_wait":true}', reply=forged_ack)
    await nc.flush()
    await asyncio.sleep(0.5)
    after = await _state(roles), await _task_streams_and_leases(roles)
    assert after == before
    for subject in refused:
        assert any(f'permissions violation for publish to "{subject.lower()}"' in e.lower() for e in errors), (subject, errors)
    assert any(f'permissions violation for publish with reply of "{forged_ack.lower()}"' in e.lower()
               for e in errors), errors
    assert not nc.is_closed


async def test_clients_and_analysts_cannot_take_task_runs(roles):
    """Nor queue runs, store results, write the task workers' bucket, forge a finish or cancel
    notice, or hear the cancels: those subjects are the service's and the task worker's."""
    pool = await _pool(roles)
    ns, tasks = roles.namespace, f"{roles.namespace.upper()}_TASKS"
    take = {
        "create a task consumer": (f"$JS.API.CONSUMER.CREATE.{tasks}.x.{ns}.task.k.scheduled",
                                   b"{}", None),
        "pull a task consumer": (f"$JS.API.CONSUMER.MSG.NEXT.{tasks}.task_scheduled_k", b'{"batch":1}', None),
        "ack a task run": (f"$JS.ACK.{tasks}.task_scheduled_k.1.1.1.0.0", b"", None),
        "queue a run on a key": (f"{ns}.task.k.scheduled", b"{}", None),
        "store a result chunk": (f"{ns}.result.{uuid.uuid4()}.{uuid.uuid4()}.0", b"x", None),
        "write the task workers' bucket": (f"$KV.{ns.upper()}_TASK_WORKERS.forged", b"{}", None),
        "forge a finish notice": (f"{ns}.taskrun.finished.{uuid.uuid4()}", b"{}", None),
        "forge a cancel notice": (f"{ns}.taskrun.cancel.k.{uuid.uuid4()}", b"{}", None),
        "forge a tag-freed notice": (f"{ns}.taskrun.tagfreed.db", b'{"tag":"db","freed":1}', None),
    }
    await _assert_refused(roles, "client", pool["id"], take)
    await _assert_refused(roles, "analyst", pool["id"], take)
    # The cancel and tag-freed notices are the task workers' to hear.
    await _assert_cannot_subscribe(roles, "client", [f"{ns}.taskrun.cancel.>", f"{ns}.taskrun.tagfreed.*"])
    await _assert_cannot_subscribe(roles, "analyst", [f"{ns}.taskrun.cancel.>", f"{ns}.taskrun.tagfreed.*"])


async def test_a_task_worker_hears_freed_tag_slots_with_its_own_credentials(roles):
    """The service announces a tag slot given back; the task worker hears it through its
    account's import, and its worker subscribes without a permissions violation."""
    from runledger.handlers.task_worker import TaskWorker

    worker_settings = roles.settings("task_worker")
    nc, _ = await roles.connect("task_worker")
    heard: asyncio.Queue = asyncio.Queue()

    async def on_notice(msg) -> None:
        await heard.put((msg.subject, json.loads(msg.data)))

    await nc.subscribe(f"{roles.namespace}.taskrun.tagfreed.*", cb=on_notice)
    await nc.flush()
    worker_nc = await connect(worker_settings, name="task-worker", wait_for_server=False)
    roles.connections.append(worker_nc)
    worker = TaskWorker(worker_nc, worker_settings, {"k": lambda: None})
    await worker.start()
    client_nc, _ = await roles.connect("client")
    broker = Broker(client_nc, roles.settings("client"))
    await broker.ok_cmd("CreateTagConcurrencyLimit", tag="db", concurrency_limit=1)
    await broker.ok_cmd("ResetTagConcurrencyLimit", tag="db", slot_override=[str(uuid.uuid4())])
    await broker.ok_cmd("ReleaseTagSlotsOfGoneTaskRuns", tag="db")
    assert await asyncio.wait_for(heard.get(), 5) == (f"{roles.namespace}.taskrun.tagfreed.db",
                                                      {"tag": "db", "freed": 1})
    await worker.stop()
    assert not roles.violations("task_worker")

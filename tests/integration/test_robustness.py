"""The service answers only inboxes, answers every request it admits exactly once in bounded
time, refuses unreachable read-your-writes waits, pages replies too large for the broker, and
answers a burst with "busy" rather than being disconnected. (Exit on a lost connection:
test_lost_connection.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import pytest

from runledger.handlers.service import Service
from runledger.infra.embedded import EmbeddedPostgres
from runledger.infra.nats_connection import connect

from .broker import Broker

pytestmark = pytest.mark.timeout(240)


def template(size: int, tag: str = "") -> dict:
    return {"job_configuration": {"command": tag + "x" * size}, "variables": {"properties": {}}}


async def _reply_to(nc, subject: str, body: bytes, timeout: float = 30) -> dict:
    msg = await nc.request(subject, body, timeout=timeout)
    return json.loads(msg.data)


# -- 1. replies only to inboxes -------------------------------------------------------------


async def test_a_request_whose_reply_subject_is_not_an_inbox_is_dropped_unexecuted(service, broker, settings):
    ns = settings.namespace
    pool = await broker.ok_cmd("CreateWorkPool", name="target", type="process")
    before = await broker.stream_messages()
    await broker.ok_cmd("CreateWorkPool", name="control", type="process")
    per_create = await broker.stream_messages() - before
    history = await broker.pool_events(pool["id"])
    count = await broker.stream_messages()

    bad = [
        f"{ns}.evt.work_pool.{pool['id']}.WorkPoolUpdated",
        f"{ns}.evt.work_pool_name.target",
        f"{ns}.idem.{'0' * 40}",
        f"{ns}.cmd.DeleteWorkPool",
        f"$KV.{settings.snapshot_bucket}.work_pool.{pool['id']}",
        f"$JS.API.STREAM.DELETE.{settings.stream_name}",
        "_INBOX.*", "_INBOX.>", "_INBOX.a.*", "_INBOX..x", "_INBOX.", "inbox.x", "_INBOX.x." + "y" * 400,
    ]
    for i, reply in enumerate(bad):
        await broker.nc.publish(settings.command_subject("UpdateWorkPool"),
                                json.dumps({"name": "target", "description": f"evil {i}"}).encode(), reply=reply)
        await broker.nc.publish(settings.command_subject("CreateWorkPool"),
                                json.dumps({"name": f"evil-{i}", "type": "process"}).encode(), reply=reply)
    await broker.nc.flush()
    # The same connection, the same subscription: once this is answered, the others were seen.
    await broker.ok_cmd("CreateWorkPool", name="after", type="process")

    assert await broker.stream_messages() == count + per_create
    assert await broker.pool_events(pool["id"]) == history
    names = {p["name"] for p in await broker.ok_qry("ListWorkPools")}
    assert names == {"target", "control", "after"}
    assert (await broker.ok_qry("GetWorkPool", name="target"))["description"] == pool["description"]
    commands = next(e for e in service.endpoints if e.kind == "command")
    assert commands.dropped.total == 2 * len(bad)


# -- 2. exactly one reply in bounded time: a stalled Postgres ------------------------------


def _pg_processes(postmaster: int) -> list[int]:
    import psutil

    proc = psutil.Process(postmaster)
    return [postmaster, *(c.pid for c in proc.children(recursive=True))]


def _postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postmaster.pid").read_text().splitlines()[0])


async def test_a_stalled_postgres_gets_queries_a_quick_unavailable_and_service_resumes(settings):
    # A Postgres of our own (its data directory's parents must let a non-root server through).
    base = Path(tempfile.mkdtemp(prefix="rlpg-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None))
    base.chmod(0o755)
    postgres = EmbeddedPostgres(base / "pg").start()
    # The default statement timeout (5 s: asyncpg gives up after 6 s), a shorter request
    # deadline (80 % of 3 s): the reply must not wait for the stuck statement to wind down.
    settings = settings.model_copy(update={"database_url": type(settings.database_url)(postgres.url),
                                           "request_timeout": 3.0})
    service = Service(settings)
    nc = None
    stopped: list[int] = []
    try:
        await service.start()
        nc = await connect(settings)
        broker = Broker(nc, settings)
        await broker.ok_cmd("CreateWorkPool", name="steady", type="process")
        # Warm the pool: several connections checked out at once, then returned.
        await asyncio.gather(*(broker.ok_qry("ListWorkPools") for _ in range(10)))

        stopped = _pg_processes(_postmaster_pid(base / "pg"))
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        # Every query is answered, each `unavailable`, well before the requester gives up.
        replies = await asyncio.gather(*(_reply_to(nc, settings.query_subject("ListWorkPools"), b"{}", timeout=5.5)
                                         for _ in range(8)))
        for down in replies:
            assert down["ok"] is False and down["error"]["code"] == "unavailable", down

        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        stopped = []

        async def answers_again():
            for _ in range(60):
                out = await _reply_to(nc, settings.query_subject("ListWorkPools"), b"{}", timeout=15)
                if out["ok"]:
                    return out
                await asyncio.sleep(0.5)
            raise AssertionError(f"queries did not answer ok again after SIGCONT: {out}")

        assert [p["name"] for p in (await answers_again())["result"]] == ["steady"]
    finally:
        for pid in stopped:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGCONT)
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.jetstream().delete_stream(settings.stream_name)
            with contextlib.suppress(Exception):
                await nc.jetstream().delete_key_value(settings.snapshot_bucket)
            with contextlib.suppress(Exception):
                await nc.close()
        await service.stop()
        postgres.stop()
        shutil.rmtree(base, ignore_errors=True)


# -- 3. min_seq: refused when unreachable, bounded waits, no slot held ----------------------


async def test_read_your_writes_waits_are_bounded_and_hold_no_slot(settings):
    from tests.conftest import cleanup_namespace

    settings = settings.model_copy(update={"query_wait_timeout": 60.0})
    # No projection runs in this service: a query waiting for a new sequence waits for real.
    service = Service(settings, roles=frozenset({"commands", "queries"}))
    projections = Service(settings, roles=frozenset({"projections"}))
    nc = None
    try:
        await service.start()
        nc = await connect(settings)
        broker = Broker(nc, settings)
        seq = (await broker.cmd("CreateWorkPool", name="waited-for", type="process"))["seq"]
        subject = settings.query_subject("ListWorkPools")

        beyond = await _reply_to(nc, subject, json.dumps({"min_seq": seq + 1000}).encode(), timeout=10)
        assert beyond["ok"] is False and beyond["error"]["code"] == "invalid", beyond
        assert str(seq) in beyond["error"]["message"]

        waiting = [asyncio.ensure_future(_reply_to(nc, subject, json.dumps({"min_seq": seq}).encode(), timeout=120))
                   for _ in range(200)]
        await asyncio.sleep(0.5)
        # An ordinary query beside 200 waits: answered (empty: nothing has been projected).
        plain = await _reply_to(nc, subject, b"{}", timeout=10)
        assert plain == {"ok": True, "result": [], "seq": None, "created": None}, plain
        refused = [w.result() for w in waiting if w.done()]
        assert len(refused) >= 200 - 32
        assert all(r["error"]["code"] == "unavailable" and "busy" in r["error"]["message"] for r in refused), refused[:3]

        await projections.start()  # the waits end once the read model reaches `seq`
        answered = await asyncio.gather(*waiting)
        reached = [r for r in answered if r["ok"]]
        assert 0 < len(reached) <= 32
        assert all([p["name"] for p in r["result"]] == ["waited-for"] for r in reached)
    finally:
        if nc is not None:
            await nc.close()
        await projections.stop()
        await service.stop()
        await cleanup_namespace(settings)


# -- 4. replies larger than the broker's max payload ---------------------------------------


async def test_a_list_too_large_for_one_message_comes_in_pages(service, broker, settings):
    for name in ("big-a", "big-b", "big-c"):
        await broker.ok_cmd("CreateWorkPool", name=name, type="process", base_job_template=template(450_000, name))
    first = await broker.qry("ListWorkPools")
    assert first["ok"] and first["truncated"] is True, {k: v for k, v in first.items() if k != "result"}
    names = [p["name"] for p in first["result"]]
    offset = first["next_offset"]
    assert offset == len(names) and 0 < offset < 3
    while True:
        page = await broker.qry("ListWorkPools", offset=offset)
        assert page["ok"], page
        names += [p["name"] for p in page["result"]]
        if not page.get("truncated"):
            break
        offset = page["next_offset"]
    assert names == ["big-a", "big-b", "big-c"]
    assert all(len(p["base_job_template"]["job_configuration"]["command"]) == 450_000 + 5 for p in first["result"])

    # The Python client (and so `runledger work-pool ls`) asks for the rest by itself.
    from runledger.client import RunledgerClient

    async with RunledgerClient(settings) as client:
        assert [p.name for p in await client.list_work_pools()] == ["big-a", "big-b", "big-c"]
        assert [p.name for p in await client.list_work_pools(limit=2)] == ["big-a", "big-b"]
        assert [p.name for p in await client.list_work_pools(offset=1)] == ["big-b", "big-c"]


# -- 6. a burst: every request one reply, no slow-consumer disconnect ----------------------


@pytest.mark.alone
async def test_a_burst_of_large_requests_is_answered_without_a_disconnect(service, broker, settings):
    # From another process, as requesters are: one in this process would share (and block)
    # the service's event loop while it writes its 270 MB.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).with_name("burst_client.py")), settings.nats_url,
        settings.command_subject("CreateWorkPool"), "300", "900000", "6", stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 200)
    seen = json.loads(out)
    codes = seen["codes"]
    assert sum(codes.values()) == 300
    # Each got a reply. (Should one not, `own_connections_cut` tells whether the requester's
    # own connection was cut, a slow consumer on its side, or the service lost it.)
    assert set(codes) <= {"ok", "invalid", "unavailable"}, seen
    assert codes.get("ok", 0) > 0, codes
    connections = [service.nc, *service.lanes]
    assert all(c.is_connected and c.stats["reconnects"] == 0 for c in connections), "disconnected (slow consumer?)"
    await broker.ok_cmd("CreateWorkPool", name="after-burst", type="process")


# -- 7. no value made from a request stops a projection; no schema check holds the service ---


HYDRATED_UNSTORABLE = {
    "json NUL": {"__prefect_kind": "json", "value": '"a\\u0000b"'},
    "json NUL key": {"__prefect_kind": "json", "value": '{"a\\u0000": 1}'},
    "json lone surrogate": {"__prefect_kind": "json", "value": '"\\ud800"'},
    "json NaN": {"__prefect_kind": "json", "value": "NaN"},
    "json integer past 64 bits": {"__prefect_kind": "json", "value": "9" * 30},
    "json 5,000 digits": {"__prefect_kind": "json", "value": "1" * 5000},
    "jinja NUL": {"__prefect_kind": "jinja", "template": "a{{ '\\x00' }}b"},
    "jinja lone surrogate": {"__prefect_kind": "jinja", "template": "{{ '\\ud800' }}"},
}


async def test_hydrated_values_the_read_model_cannot_store_are_invalid(broker):
    """Postgres rejects a NUL (and cannot encode a lone surrogate); had such a value been
    appended, the projection would stop at it for good, and no later write would be readable."""
    flow = await broker.ok_cmd("CreateFlow", name="etl")
    deployment = await broker.ok_cmd("CreateDeployment", name="d", flow_id=flow["id"], enforce_parameter_schema=False)
    before = await broker.stream_messages()
    for label, value in HYDRATED_UNSTORABLE.items():
        for name, body in (("CreateFlowRunFromDeployment", {"deployment_id": deployment["id"]}),
                           ("UpdateDeployment", {"id": deployment["id"]})):
            out = await broker.cmd(name, **body, parameters={"x": value})
            got = (out["ok"], out.get("error", {}).get("code"), out.get("error", {}).get("field"))
            assert got == (False, "invalid", "parameters"), (label, name, out)
            assert "hydrating" in out["error"]["message"], (label, name, out)
    assert await broker.stream_messages() == before
    # Both projections still advance: later writes are readable (queries wait for them).
    run = await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=deployment["id"], parameters={"x": "ok"})
    await broker.ok_cmd("UpdateDeployment", id=deployment["id"], description="later")
    assert (await broker.ok_qry("GetFlowRun", id=run["id"]))["parameters"] == {"x": "ok"}
    assert (await broker.ok_qry("GetDeployment", id=deployment["id"]))["description"] == "later"


async def test_parameter_schemas_that_were_slow_to_check_are_answered_and_the_service_stays_up(broker):
    """Each of these held the service's event loop, and so every other request, for 30 s to
    hours: unique objects (compared pairwise), a pattern that backtracks catastrophically, and
    one that still backtracks too much (refused as invalid)."""
    flow = await broker.ok_cmd("CreateFlow", name="etl")
    unique = {"type": "object", "properties": {"x": {"type": "array", "uniqueItems": True}}}
    deployment = await broker.ok_cmd("CreateDeployment", name="unique", flow_id=flow["id"],
                                     parameter_openapi_schema=unique, enforce_parameter_schema=True)
    run = await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=deployment["id"],
                              parameters={"x": [{"a": i} for i in range(5000)]})
    assert len(run["parameters"]["x"]) == 5000

    def backtracking(pattern: str) -> dict:
        return {"type": "object", "properties": {"x": {"type": "string", "pattern": pattern}}}

    out = await broker.cmd("CreateDeployment", name="p1", flow_id=flow["id"], enforce_parameter_schema=True,
                           parameter_openapi_schema=backtracking("^(a+)+$"), parameters={"x": "a" * 29 + "!"})
    assert (out["ok"], out["error"]["code"]) == (False, "invalid"), out  # as any mismatch at creation
    assert "does not match '^(a+)+$'" in out["error"]["message"]
    before = await broker.stream_messages()
    out = await broker.cmd("CreateDeployment", name="p2", flow_id=flow["id"], enforce_parameter_schema=True,
                           parameter_openapi_schema=backtracking("^(a|aa)+$"), parameters={"x": "a" * 60 + "!"})
    assert (out["ok"], out["error"]["code"]) == (False, "invalid"), out
    assert "could not be checked in time" in out["error"]["message"]
    assert await broker.stream_messages() == before
    assert (await broker.ok_qry("GetServiceHealth"))["projections"]
    assert (await broker.ok_qry("GetFlowRun", id=run["id"]))["parameters"]["x"][4999] == {"a": 4999}

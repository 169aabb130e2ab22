"""Task workers bound to task keys, against a real nats-server configured as `runledger up`
configures it: a worker bound to `add` serves `add` with its own credentials, and can neither
take, settle nor report on the runs of another key, nor hear its cancels, nor force a state,
nor write another worker's heartbeat; a header it forges does not change who the broker says it is; the task
worker role's own user still serves every key."""

from __future__ import annotations

import asyncio
import json
import re

import nats
import pytest

from runledger.client import RunledgerClient
from runledger.client.tasks import submit_task, task_result, wait_for_task_run
from runledger.commands.task_keys import encode_task_key
from runledger.handlers.task_worker import TaskWorker
from runledger.infra import broker_auth
from runledger.infra.nats_connection import connect
from runledger.infra.task_queues import consumer_name, task_stream_name, task_subject

from .test_roles import Roles, roles_served
from .test_task_cancel import blocking_task

pytestmark = pytest.mark.asyncio

BOUND = {"adder": ["add"]}
ADDER = broker_auth.bound_task_worker_user("adder")


@pytest.fixture
async def bound(server_urls, tmp_path):
    async with roles_served(server_urls, tmp_path, BOUND, task_queue_sizes={"tiny": 1}) as r:
        yield r


async def _serving(r: Roles, user: str, functions: dict) -> tuple[TaskWorker, asyncio.Event, asyncio.Task]:
    settings = r.settings(user)
    nc = await connect(settings, name=user, wait_for_server=False)
    r.connections.append(nc)
    worker = TaskWorker(nc, settings, functions)
    await worker.start()
    stop = asyncio.Event()
    return worker, stop, asyncio.create_task(worker.serve(stop))


async def _command(nc, r: Roles, name: str, body: dict, headers: dict | None = None) -> dict:
    reply = await nc.request(f"{r.namespace}.cmd.{name}", json.dumps(body).encode(), timeout=5, headers=headers)
    return json.loads(reply.data)


async def test_a_bound_task_worker_serves_its_keys_with_its_own_credentials(bound):
    creds = bound.creds[ADDER]
    assert creds["task_keys"] == ["add"] and creds["inbox_prefix"] == f"_INBOX.{ADDER}"

    async def add(a: int, b: int) -> int:
        return a + b

    worker, stop, serving = await _serving(bound, ADDER, {"add": add})
    try:
        async with RunledgerClient(bound.settings("client")) as client:
            run = await submit_task(client, "add", {"a": 2, "b": 3})
            assert task_result(await wait_for_task_run(client, run.id, timeout=10)) == 5
            workers = await client.read_task_workers()
            assert [(w.identifier, w.task_keys) for w in workers] == [(worker.worker_id, ["add"])]
    finally:
        stop.set()
        await asyncio.wait_for(serving, 10)
    assert not bound.violations(ADDER)


async def test_a_bound_task_worker_cannot_take_settle_or_report_on_other_keys(bound):
    async with RunledgerClient(bound.settings("client")) as client:
        other = await submit_task(client, "mul", {"a": 2, "b": 3})
        mine = await submit_task(client, "add", {"a": 1, "b": 1})
    nc, errors = await bound.connect(ADDER)

    # The other key's consumer: neither made nor pulled from nor acknowledged on.
    stream = task_stream_name(bound.settings("service"), "scheduled")
    theirs = consumer_name("mul", "scheduled")
    create = f"{broker_auth.TASK_WORKER_JS_API}.CONSUMER.CREATE.{stream}.{theirs}.{task_subject(bound.settings('service'), 'mul', 'scheduled')}"
    with pytest.raises(nats.errors.TimeoutError):  # refused by the server: nothing answers
        await nc.request(create, json.dumps({"stream_name": stream, "config": {"durable_name": theirs}}).encode(),
                         timeout=1)
    await nc.publish(f"{broker_auth.TASK_WORKER_JS_API}.CONSUMER.MSG.NEXT.{stream}.{theirs}", b'{"batch": 1}')
    await nc.publish(f"$JS.ACK.{stream}.{theirs}.1.1.1.0.0", b"+ACK")
    # Another worker's heartbeat entry.
    await nc.publish(f"$KV.{bound.namespace.upper()}_TASK_WORKERS.task_worker.forged", b"{}")
    # The other key's cancel notices: not heard; nor any key's forged.
    their_cancels = broker_auth.cancel_subject(bound.namespace, encode_task_key("mul"))
    await nc.subscribe(their_cancels)
    await nc.publish(f"{bound.namespace}.taskrun.cancel.{encode_task_key('add')}.{mine.id}", b"{}")
    await nc.flush()
    await asyncio.sleep(0.3)
    refused = "\n".join(bound.violations(ADDER))
    for subject in (create, f"CONSUMER.MSG.NEXT.{stream}.{theirs}", f"$JS.ACK.{stream}.{theirs}",
                    "_TASK_WORKERS.task_worker.forged", f"{bound.namespace}.taskrun.cancel.add."):
        assert subject in refused, subject
    assert any(f'violation for subscription to "{their_cancels}"' in e.lower() for e in errors), errors

    # Reports: not on another key's run, not forced, whatever header it writes itself.
    start = {"id": str(other.id), "state": {"type": "RUNNING"}, "task_worker_id": "adder-1"}
    forged = {broker_auth_header(): json.dumps({"acc": broker_auth.SERVICE_ACCOUNT, "user": "client"})}
    for headers in (None, forged):
        refused_reply = await _command(nc, bound, "SetTaskRunState", start, headers)
        assert refused_reply["error"]["code"] == "forbidden", refused_reply
        assert "only on runs of the task keys ['add'], not 'mul'" in refused_reply["error"]["message"]
    forced = await _command(nc, bound, "SetTaskRunState", {"id": str(mine.id), "state": {"type": "COMPLETED"},
                                                            "force": True})
    assert forced["error"]["code"] == "forbidden" and "may not force" in forced["error"]["message"]
    # The same in one request of many: each held to the keys on its own.
    bulk = await _command(nc, bound, "SetTaskRunStates", {"states": [
        start, {"id": str(mine.id), "state": {"type": "COMPLETED"}, "force": True}]})
    assert [item["error"]["code"] for item in bulk["result"]] == ["forbidden", "forbidden"], bulk
    allowed = await _command(nc, bound, "SetTaskRunState", {"id": str(mine.id), "state": {"type": "CANCELLED"}})
    assert allowed["ok"] and allowed["orchestration"]["status"] == "ACCEPT", allowed
    async with RunledgerClient(bound.settings("client")) as client:
        assert (await client.read_task_run(other.id, min_seq=await client.catch_up())).state_type == "SCHEDULED"

    # The task worker role's own user serves every key, bound ones included.
    async def mul(a: int, b: int) -> int:
        return a * b

    worker, stop, serving = await _serving(bound, "task_worker", {"mul": mul})
    try:
        async with RunledgerClient(bound.settings("client")) as client:
            assert task_result(await wait_for_task_run(client, other.id, timeout=10)) == 6
    finally:
        stop.set()
        await asyncio.wait_for(serving, 10)
    assert not bound.violations("task_worker")


async def test_a_bound_task_worker_hears_the_cancels_of_its_keys(bound):
    """Its permissions name its keys' cancel notices: a run of its key cancelled while it runs
    is stopped and ends CANCELLED, and nothing it did was refused."""
    add, started, stopped = blocking_task()
    worker, stop, serving = await _serving(bound, ADDER, {"add": add})
    try:
        async with RunledgerClient(bound.settings("client")) as client:
            run = await submit_task(client, "add", {"a": 1, "b": 2})
            await asyncio.wait_for(started.wait(), 10)
            assert (await client.cancel_task_run(run.id)).state.type == "CANCELLING"
            assert (await wait_for_task_run(client, run.id, timeout=5)).state_type == "CANCELLED"
    finally:
        stop.set()
        await asyncio.wait_for(serving, 10)
    assert stopped == [True] and worker.cancelled == 1
    assert not bound.violations(ADDER)


def broker_auth_header() -> str:
    from runledger.handlers.endpoint import REQUEST_INFO_HEADER

    return REQUEST_INFO_HEADER


async def test_task_worker_as_a_bound_name_serves_only_its_keys(tmp_path, monkeypatch):
    """`runledger task-worker --as NAME` refuses, before connecting, a key NAME is not bound
    to, and a name bound to nothing."""
    from typer.testing import CliRunner

    from runledger.cli.main import _register, app

    _register()
    (tmp_path / "bound_tasks_mod.py").write_text(
        "from runledger.client.tasks import task\n\n"
        "@task(key='add')\nasync def add(a, b):\n    return a + b\n\n"
        "@task(key='mul')\nasync def mul(a, b):\n    return a * b\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # "." may be cached for another directory by now
    monkeypatch.setenv("RUNLEDGER_CONFIG_DIR", str(tmp_path / "config"))  # no endpoint file
    env = {"RUNLEDGER_TASK_WORKER_KEYS": json.dumps(BOUND)}
    runner = CliRunner()
    def said(result) -> str:  # the usage error's box, as one line
        return " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.stderr).split())

    outside = runner.invoke(app, ["task-worker", "--module", "bound_tasks_mod", "--key", "mul", "--as", "adder"], env=env)
    assert outside.exit_code == 2 and "'adder' is bound to 'add', not to 'mul'" in said(outside)
    unknown = runner.invoke(app, ["task-worker", "--module", "bound_tasks_mod", "--key", "add", "--as", "nobody"], env=env)
    assert unknown.exit_code == 2 and "no task worker is bound to keys under the name 'nobody'" in said(unknown)


async def test_a_run_a_bound_task_worker_submits_to_a_full_key_is_cancelled_for_it(bound):
    """The service's own correction (cancelling a run it could not queue, a forced state) is
    not held to the submitter's limits."""
    from runledger.client import Unavailable

    async with RunledgerClient(bound.settings(ADDER)) as as_adder:
        queued = await submit_task(as_adder, "tiny", {})  # another key: a task may submit any
        with pytest.raises(Unavailable, match="Task key 'tiny' is full"):
            await submit_task(as_adder, "tiny", {})
    async with RunledgerClient(bound.settings("client")) as client:
        await client.catch_up()
        runs = (await client.query("ListTaskRuns", {"task_runs": {"task_key": {"any_": ["tiny"]}}},
                                   min_seq=await client.catch_up())).result
    assert sorted(r["state_type"] for r in runs) == ["CANCELLED", "SCHEDULED"]
    assert [r["id"] for r in runs if r["state_type"] == "SCHEDULED"] == [str(queued.id)]

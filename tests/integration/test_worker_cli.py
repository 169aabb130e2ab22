"""The `worker` verbs and `work-pool get-runs` / `preview` against the real service, one test per
verb, each CLI run a new client that must see what was written just before it: workers made
by heartbeats, runs placed on queues with priorities, the poll that `get-runs` records, and
the one `preview` must not."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

from runledger.client import RunledgerClient
from tests.integration.broker import cli_in_thread

_cli = cli_in_thread


async def _eventually(check, timeout: float = 5.0):
    """The value of `check()` once it is truthy (a poll is recorded in the background)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await check()
        if value or asyncio.get_running_loop().time() > deadline:
            return value
        await asyncio.sleep(0.05)


async def _pool_with_runs(settings) -> dict[str, str]:
    """Pool `pool`: queue `urgent` (priority 1) before `default` (2), five SCHEDULED runs:
    four due within the hour (one not before 30 min from now) and one in five hours.
    Returns their names by id."""
    now = datetime.now(UTC)
    async with RunledgerClient(settings, idempotency_keys=True) as rl:
        await rl.create_work_pool("pool", type="process")
        await rl.create_work_queue("pool", "urgent", priority=1)
        flow = await rl.create_flow("etl")
        names = {}
        for name, queue, priority, minutes in (("d-soon", "default", 0, -5), ("u-low", "urgent", 5, -10),
                                               ("u-high", "urgent", 0, 20), ("u-later", "urgent", 0, 30),
                                               ("d-far", "default", 0, 300)):
            at = (now + timedelta(minutes=minutes)).isoformat()
            run = await rl.create_flow_run(flow.id, name=name, work_pool_name="pool", work_queue_name=queue,
                                           priority=priority,
                                           state={"type": "SCHEDULED", "state_details": {"scheduled_time": at}})
            names[str(run.id)] = name
    return names


async def _queue_polled(settings, name: str):
    async with RunledgerClient(settings) as rl:
        return (await rl.read_work_queue("pool", name)).last_polled


async def test_worker_ls(service, settings):
    cli = _cli(settings)
    async with RunledgerClient(settings) as rl:
        await rl.create_work_pool("pool", type="process")
        await rl.worker_heartbeat("pool", "w1", heartbeat_interval_seconds=15)
        await rl.worker_heartbeat("pool", "w2")
    table = await cli("worker", "ls", "--pool", "pool")
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["Name", "Status", "Last", "Heartbeat", "Heartbeat", "Interval"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["w1"][1] == "ONLINE" and rows["w1"][3] == "15s" and rows["w2"][3] == "-"
    listed = json.loads((await cli("worker", "ls", "-p", "pool", "--status", "online", "--limit", "1", "-o",
                                   "json")).stdout)
    assert [w["name"] for w in listed] == ["w2"]  # the latest heartbeat first
    offline = await cli("worker", "ls", "--pool", "pool", "--status", "OFFLINE")
    assert offline.exit_code == 0 and offline.stdout == "No workers found.\n"
    missing = await cli("worker", "ls", "--pool", "nope")
    assert missing.exit_code == 3 and missing.stderr == 'Error (not_found): Work pool "nope" not found.\n'


async def test_worker_delete(service, settings):
    cli = _cli(settings)
    async with RunledgerClient(settings) as rl:
        await rl.create_work_pool("pool", type="process")
        await rl.worker_heartbeat("pool", "w1")
    deleted = await cli("worker", "delete", "w1", "--pool", "pool")
    assert deleted.exit_code == 0, deleted.output
    assert deleted.stdout == "Deleted worker 'w1' of work pool 'pool'.\n"
    assert json.loads((await cli("worker", "ls", "--pool", "pool", "--json")).stdout) == []
    again = await cli("worker", "delete", "w1", "--pool", "pool", "--json")
    assert again.exit_code == 3 and again.stderr == "Error (not_found): Worker 'w1' not found in work pool 'pool'.\n"
    no_pool = await cli("worker", "delete", "w1", "--pool", "nope")
    assert no_pool.exit_code == 3 and no_pool.stderr == 'Error (not_found): Work pool "nope" not found.\n'


async def test_work_pool_get_runs(service, settings):
    cli = _cli(settings)
    names = await _pool_with_runs(settings)
    assert await _queue_polled(settings, "urgent") is None
    polled = await cli("work-pool", "get-runs", "pool", "--json")
    assert polled.exit_code == 0, polled.output
    items = json.loads(polled.stdout)
    # The service's order: queue priority, run priority, scheduled time.
    assert [names[i["flow_run"]["id"]] for i in items] == ["u-high", "u-later", "u-low", "d-soon", "d-far"]
    assert {i["flow_run"]["work_pool_name"] for i in items} == {"pool"}
    # Recorded as a worker's poll: the queues polled become READY.
    assert await _eventually(lambda: _queue_polled(settings, "urgent")) is not None
    async with RunledgerClient(settings) as rl:
        assert await _eventually(lambda: _ready(rl, "default"))

    before = (datetime.now(UTC) + timedelta(minutes=25)).isoformat()
    table = await cli("work-pool", "get-runs", "pool", "-q", "urgent", "--scheduled-before", before, "--limit", "5")
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["ID", "Name", "Queue", "State", "Scheduled", "Priority"]
    assert [line.split()[1:4] + line.split()[-1:] for line in lines[1:]] == [
        ["u-high", "urgent", "Scheduled", "0"], ["u-low", "urgent", "Scheduled", "5"]]
    assert (await cli("work-pool", "get-runs", "pool", "--limit", "0")).stdout == "No scheduled flow runs found.\n"
    missing = await cli("work-pool", "get-runs", "pool", "-q", "gpu")
    assert missing.exit_code == 3 and missing.stderr == "Error (not_found): Work pool queue 'pool/gpu' not found.\n"


async def _ready(rl: RunledgerClient, queue: str) -> bool:
    return (await rl.read_work_queue("pool", queue)).status == "READY"


async def test_work_pool_preview(service, settings):
    cli = _cli(settings)
    names = await _pool_with_runs(settings)
    shown = await cli("work-pool", "preview", "pool", "--json")
    assert shown.exit_code == 0, shown.output
    # Due within the hour (the default), sorted as the poll sorts them.
    assert [names[r["id"]] for r in json.loads(shown.stdout)] == ["u-high", "u-later", "u-low", "d-soon"]
    wider = await cli("work-pool", "preview", "pool", "--hours", "6", "-q", "default")
    assert wider.exit_code == 0, wider.output
    assert [line.split()[1] for line in wider.stdout.splitlines()[1:]] == ["d-soon", "d-far"]
    async with RunledgerClient(settings) as rl:
        await rl.update_work_queue("pool", "urgent", is_paused=True)
    noted = await cli("work-pool", "preview", "pool", "--hours", "0.25")
    assert noted.exit_code == 0, noted.output
    assert [line.split()[1] for line in noted.stdout.splitlines()[1:3]] == ["u-low", "d-soon"]
    assert noted.stdout.splitlines()[-1] == "Note: paused queues, whose runs workers do not get: urgent."
    for hours in ("1e9", "inf"):  # past what a date holds: a usage error, not a traceback
        far = await cli("work-pool", "preview", "pool", "--hours", hours)
        assert far.exit_code == 2 and "--hours" in far.stderr and "Traceback" not in far.output, far.output
    missing = await cli("work-pool", "preview", "nope")
    assert missing.exit_code == 3 and missing.stderr == 'Error (not_found): Work pool "nope" not found.\n'
    # Nothing was recorded: no queue was polled, none became READY.
    await asyncio.sleep(0.5)
    async with RunledgerClient(settings) as rl:
        queues = await rl.list_work_queues("pool")
    assert [(q.name, q.last_polled, q.status) for q in queues] == [
        ("urgent", None, "PAUSED"), ("default", None, "NOT_READY")]

"""What the fault tests of task runs share: in-process task workers, a submitter that keeps
trying through an outage, and the check that every run ran to completion exactly once."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable

from runledger.client import RunledgerClient
from runledger.client.tasks import submit_task, wait_for_task_run
from runledger.handlers.task_worker import TaskWorker
from runledger.infra.event_store import EventStore
from runledger.infra.nats_connection import connect


async def submit_until_ok(client: RunledgerClient, i: int) -> uuid.UUID:
    """Submits run i, again and again while the service or the broker is away: the dynamic key
    makes a repeat return the run made the first time."""
    while True:
        try:
            run = await submit_task(client, "work", {"i": i}, dynamic_key=f"run-{i}")
            return run.id
        except Exception:
            await asyncio.sleep(0.2)


async def wait_all_finished(client: RunledgerClient, ids: list[uuid.UUID], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    pending = set(ids)
    while pending and time.monotonic() < deadline:
        for run_id in list(pending)[:200]:
            with contextlib.suppress(Exception):
                run = await wait_for_task_run(client, run_id, timeout=0.05)
                if run.state_type == "COMPLETED":
                    pending.discard(run_id)
        await asyncio.sleep(0.1)
    assert not pending, f"{len(pending)} task runs did not complete"


async def assert_each_ran_once(client: RunledgerClient, settings, ids: list[uuid.UUID],
                               seen: collections.Counter[int]) -> None:
    """Every run submitted (`ids`, numbered from 0) ran exactly once: as the functions saw
    it (`seen`: calls per number), and as the log says (one RUNNING, one COMPLETED each)."""
    assert sorted(seen) == list(range(len(ids)))
    twice = {i: n for i, n in seen.items() if n != 1}
    assert not twice, f"ran more than once: {twice}"
    store = EventStore(client._nc, settings)
    for run_id in ids:
        events = await store.read_aggregate("task_run", str(run_id))
        types = [e.envelope.payload["run"]["state"]["type"] for e in events if "run" in e.envelope.payload]
        assert types.count("RUNNING") == 1 and types.count("COMPLETED") == 1, (run_id, types)


@contextlib.asynccontextmanager
async def task_workers(settings, functions: dict[str, Callable], count: int,
                       keys_of: Callable[[int], list[str]] | None = None) -> AsyncIterator[None]:
    """`count` task workers in this process, each on a connection of its own, serving
    `functions` until the block ends (worker n its keys in the order `keys_of(n)`, if given)."""
    connections, serving, stop = [], [], asyncio.Event()
    try:
        for n in range(count):
            nc = await connect(settings, name=f"worker-{n}")
            connections.append(nc)
            order = {"keys": keys_of(n)} if keys_of is not None else {}
            worker = TaskWorker(nc, settings, functions, limit=8, worker_id=f"w{n}", **order)
            await worker.start()
            serving.append(asyncio.create_task(worker.serve(stop)))
        yield
    finally:
        stop.set()
        for task in serving:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 30)
        for nc in connections:
            with contextlib.suppress(Exception):
                await nc.close()


async def submit_flow(client: RunledgerClient, count: int, ids: list[uuid.UUID]) -> None:
    """Submits runs 0 .. count-1 as a flow, not one burst, each through any outage; their ids
    go into `ids` as they are made."""
    for i in range(count):
        ids.append(await submit_until_ok(client, i))
        if i % 50 == 0:
            await asyncio.sleep(0.05)

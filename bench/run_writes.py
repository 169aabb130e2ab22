"""A run read model's batches written two ways, side by side: from the events decoded (the
service parses each event and encodes the rows) and from the events as stored (Postgres reads
the rows out of the envelopes, `raw_writes`). Prints the service's Python time and the
statement's time per event; no NATS, an embedded Postgres (or RUNLEDGER_DATABASE_URL).

    python bench/run_writes.py [--runs 3000] [--batch 10,50] [--rounds 3]

Task runs of three states each (created, RUNNING, COMPLETED). "apart": each batch holds
distinct runs, as when tasks stream through (a run's states come milliseconds apart);
"together": a run's three states in one batch, the case where the envelopes cost Postgres
most (each state event carries the whole run, parsed for the state alone). Then what taking
a connection and giving it back costs a batch: from the engine's (SQLAlchemy's) pool, as the
projections did, and from `DriverConnections` (asyncpg's pool), as they do now; and how long
validating a create-run command's body takes (the models' defaults made without copies).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from datetime import UTC, datetime

from harness import bench_settings, report, servers
from sqlalchemy import text

from runledger.commands import task_runs as tr
from runledger.commands.deployment_runs import CreateFlowRunFromDeployment
from runledger.commands.events import encode_event
from runledger.commands.states import State, StateDetails, StateType
from runledger.infra.database import DriverConnections, asyncpg_connection, create_engine, migrate
from runledger.infra.event_loop import run
from runledger.projections.runner import (
    RawEvent,
    _numbered_arguments,
    _one_statement_sql,
    decode_batch,
    stored_events,
)
from runledger.projections.tables import MIGRATIONS
from runledger.projections.task_runs import TaskRunsProjector

STATES = (StateType.SCHEDULED, StateType.RUNNING, StateType.COMPLETED)


def task_run_events(runs: int, apart: bool) -> list[RawEvent]:
    now = datetime.now(UTC)
    by_run = []
    for r in range(runs):
        run_id = uuid.uuid4()
        mine = []
        for k, state_type in enumerate(STATES):
            state = State(id=uuid.uuid4(), type=state_type, name=state_type.value.title(), timestamp=now,
                          state_details=StateDetails(task_run_id=run_id))
            task_run = tr.TaskRun.model_validate({
                "id": run_id, "created": now, "updated": now, "name": f"bench-{r}", "task_key": "bench.key",
                "dynamic_key": str(r), "tags": ["bench"], "labels": {"team": "a"}, "parameters": {"n": r},
                "state": state, "state_id": state.id, "state_type": state.type, "state_name": state.name})
            event = (tr.TaskRunCreated if k == 0 else tr.TaskRunStateSet)(run=task_run)
            envelope = encode_event(str(run_id), event, occurred=now, event_id=uuid.uuid4())
            mine.append((f"ns.evt.task_run.{run_id}.{event.event_type}", envelope.data))
        by_run.append(mine)
    ordered = ([e for k in range(len(STATES)) for mine in by_run for e in mine[k:k + 1]] if apart
               else [e for mine in by_run for e in mine])
    return [RawEvent(seq, subject, data) for seq, (subject, data) in enumerate(ordered, start=1)]


async def one_pass(connections: DriverConnections, log: list[RawEvent], batch: int, stored: bool) -> tuple[float, float]:
    """Seconds per event: the service's part (decode and encode, or neither) and the statement's."""
    projector = TaskRunsProjector()
    pool = await connections.pool()
    async with pool.acquire() as driver:
        await driver.execute("TRUNCATE task_runs, task_run_states")
    python = statement = 0.0
    for i in range(0, len(log), batch):
        events = log[i:i + batch]
        t0 = time.perf_counter()
        if stored:
            writes = projector.raw_writes(stored_events(projector, events) or [])
        else:
            decoded, _ = decode_batch(projector, events, datetime.now(UTC))
            writes = projector.writes(decoded)
        assert writes is not None
        args: list = ["bench", events[-1].seq, datetime.now(UTC), events[0].seq]
        sql = _one_statement_sql(tuple(sql for sql, _ in writes), _numbered_arguments(writes, args, "bench"))
        t1 = time.perf_counter()
        async with pool.acquire() as driver:  # no checkpoint row: the statement's writes alone
            await driver.fetchval(sql.rsplit(" SELECT CASE", 1)[0] + " SELECT 1", *args)
        t2 = time.perf_counter()
        python, statement = python + t1 - t0, statement + t2 - t1
    return python / len(log), statement / len(log)


async def checkout_seconds(engine, connections: DriverConnections, times: int) -> tuple[float, float]:
    """Seconds per connection taken and given back: the engine's pool, then the driver's."""
    t0 = time.perf_counter()
    for _ in range(times):
        async with engine.connect() as conn:
            await asyncpg_connection(conn)
    t1 = time.perf_counter()
    for _ in range(times):
        async with (await connections.pool()).acquire():
            pass
    return (t1 - t0) / times, (time.perf_counter() - t1) / times


def validation_seconds(times: int) -> float:
    """Seconds per create-run command body validated as the command bus does (strict, JSON)."""
    body = json.dumps({"deployment_id": str(uuid.uuid4()), "parameters": {"c": 1}}).encode()
    model = CreateFlowRunFromDeployment
    model.model_validate_json(body, strict=True)
    t0 = time.perf_counter()
    for _ in range(times):
        model.model_validate_json(body, strict=True)
    return (time.perf_counter() - t0) / times


async def main(args: argparse.Namespace) -> None:
    rows = []
    with servers() as urls:
        settings = bench_settings(urls)
        engine = create_engine(settings, pool_size=1)
        await migrate(engine, settings.db_schema, MIGRATIONS)
        connections = DriverConnections(engine)
        try:
            for apart in (True, False):
                log = task_run_events(args.runs, apart)
                for batch in args.batch:
                    passes: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
                    for _ in range(args.rounds):  # the two ways alternate within each round
                        for stored in (False, True):
                            passes[stored].append(await one_pass(connections, log, batch, stored))
                    medians = {stored: [statistics.median(p[i] for p in done) * 1e6 for i in range(2)]
                               for stored, done in passes.items()}
                    where = "apart" if apart else "together"
                    for stored, name in ((False, "decoded"), (True, "as stored")):
                        py, st = medians[stored]
                        rows.append((f"task-run events {name}, {where}, batches of {batch}: service's part / "
                                     f"statement, per event", f"{py:.1f} / {st:.1f} µs", ""))
            checkouts = [await checkout_seconds(engine, connections, 3000) for _ in range(args.rounds)]
            rows.append(("a connection taken and given back: the engine's pool / asyncpg's (`DriverConnections`)",
                         f"{statistics.median(c[0] for c in checkouts) * 1e6:.1f} / "
                         f"{statistics.median(c[1] for c in checkouts) * 1e6:.1f} µs", ""))
            rows.append(("a create-run command's body validated",
                         f"{statistics.median(validation_seconds(5000) for _ in range(args.rounds)) * 1e6:.1f} µs", ""))
        finally:
            await connections.close()
            async with engine.begin() as conn:
                await conn.execute(text(f'DROP SCHEMA IF EXISTS "{settings.db_schema}" CASCADE'))
            await engine.dispose()
    report("A run read model's writes, decoded or as stored (bench/run_writes.py)", rows)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3000)
    p.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[10, 50])
    p.add_argument("--rounds", type=int, default=3)
    run(main(p.parse_args()), "uvloop")

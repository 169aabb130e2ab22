"""The pool poll (`GetScheduledFlowRuns`) against a large read model: p50 and p99 of the poll's
database work with `limit 10`, with 10,000 SCHEDULED runs over four queues (one with a
concurrency limit, a pool limit too) and, by default, 1,000,000 finished runs of history.

The rows are written straight into the read model's tables with COPY (no projection); the
poll is timed twice: the database work alone, and through the broker as a worker sends it
(`runledger serve`): `.venv/bin/python -m bench.poll [--history N] [--polls N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import text

from runledger.commands import queries as q
from runledger.infra.database import create_engine, migrate
from runledger.infra.nats_connection import connect
from runledger.projections.scheduled_runs import poll
from runledger.projections.tables import MIGRATIONS, flow_runs

from .harness import bench_settings, now, percentile, report, servers, service_process

QUEUES = ("default", "high", "low", "limited")
COLUMNS = [c.name for c in flow_runs.columns]


def _run(queue: tuple[uuid.UUID, str], flow_id: uuid.UUID, state_type: str, state_name: str, at: datetime,
         priority: int = 0) -> tuple:
    values = {
        "id": uuid.uuid4(), "created": at, "updated": at, "name": "run", "flow_id": flow_id,
        "work_queue_name": queue[1], "work_queue_id": queue[0], "parameters": "{}", "context": "{}",
        "empirical_policy": '{"retries": 0}', "tags": "[]", "labels": "{}", "state_type": state_type,
        "state_name": state_name, "run_count": 0, "expected_start_time": at, "next_scheduled_start_time": at,
        "total_run_time": timedelta(0), "auto_scheduled": True, "job_variables": "{}", "priority": priority,
        "deployment_lease_expired": False, "pool_slot_reserved": False,
    }
    return tuple(values.get(c) for c in COLUMNS)


async def load(engine, schema: str, scheduled: int, history: int) -> None:
    start = datetime.now(UTC)
    pool_id, flow_id = uuid.uuid4(), uuid.uuid4()
    queues = [(uuid.uuid4(), name) for name in QUEUES]
    async with engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO work_pools VALUES (:id, 'bench', NULL, 'process', '{}', false, 500, '{}', 'READY', :q,"
            " now(), now())"), {"id": pool_id, "q": queues[0][0]})
        for priority, (qid, name) in enumerate(queues, start=1):
            await conn.execute(text(
                "INSERT INTO work_queues VALUES (:id, :pool, :name, '', false, :limit, :priority, 'READY', NULL,"
                " now(), now())"), {"id": qid, "pool": pool_id, "name": name, "priority": priority,
                                    "limit": 80 if name == "limited" else None})
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        rng = random.Random(7)

        async def copy(rows: list[tuple]) -> None:
            await driver.copy_records_to_table("flow_runs", records=rows, columns=COLUMNS, schema_name=schema)

        batch: list[tuple] = []
        for i in range(scheduled):
            batch.append(_run(queues[i % len(queues)], flow_id, "SCHEDULED", "Scheduled",
                              start + timedelta(seconds=rng.randint(-3600, 86400)), priority=rng.choice((0, 0, 0, -1))))
        for i in range(200):  # slots in use
            batch.append(_run(queues[i % len(queues)], flow_id, "RUNNING" if i % 2 else "PENDING", "Running", start))
        await copy(batch)
        for done in range(0, history, 100_000):
            await copy([_run(queues[i % len(queues)], flow_id, "COMPLETED", "Completed",
                             start - timedelta(seconds=i)) for i in range(done, min(history, done + 100_000))])
        await conn.execute(text("ANALYZE flow_runs"))


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scheduled", type=int, default=10_000)
    parser.add_argument("--history", type=int, default=1_000_000)
    parser.add_argument("--polls", type=int, default=500)
    args = parser.parse_args()
    with servers() as urls:
        settings = bench_settings(urls)
        engine = create_engine(settings, statement_timeout=None)
        await migrate(engine, settings.db_schema, MIGRATIONS)
        loaded = now()
        await load(engine, settings.db_schema, args.scheduled, args.history)
        loaded = now() - loaded
        query = q.GetScheduledFlowRuns(work_pool_name="bench", limit=10)
        named = q.GetScheduledFlowRuns(work_pool_name="bench", work_queue_names=["limited"], limit=10)
        figures = {}
        for label, qry in (("whole pool", query), ("one queue with a limit", named)):
            times = []
            async with engine.connect() as conn:
                for _ in range(20):
                    await poll(conn, qry)  # warm the plan and the cache
                for _ in range(args.polls):
                    t = now()
                    answer = await poll(conn, qry)
                    times.append((now() - t) * 1000)
                assert len(answer.items) == 10, len(answer.items)
            figures[label] = times
        # The same through the broker, as a worker polls: a `runledger serve` process answers
        # the query (the poll's record of the queues is sent too, and refused: this pool
        # exists only in the read model).
        with service_process(settings):
            nc = await connect(bench_settings(urls, role="client"))
            for label, qry in (("whole pool", query), ("one queue with a limit", named)):
                body = qry.model_dump_json(exclude_none=True).encode()
                times = []
                for i in range(20 + args.polls):
                    t = now()
                    reply = json.loads((await nc.request(settings.query_subject("GetScheduledFlowRuns"), body,
                                                         timeout=10)).data)
                    if i >= 20:
                        times.append((now() - t) * 1000)
                assert reply["ok"] and len(reply["result"]) == 10, reply
                figures[f"{label}, through the broker"] = times
            await nc.close()
        await engine.dispose()
    rows = [(f"poll, {label}, limit 10: p50 / p99", f"{percentile(t, 50):.2f} / {percentile(t, 99):.2f} ms", "")
            for label, t in figures.items()]
    rows.append(("rows loaded (COPY)", f"{args.scheduled:,} scheduled + 200 active + {args.history:,} finished "
                 f"in {loaded:.1f} s", ""))
    report("Pool poll (GetScheduledFlowRuns)", rows)


if __name__ == "__main__":
    asyncio.run(main())

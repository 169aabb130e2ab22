"""Property: the pool poll (`GetScheduledFlowRuns`) answers what its documented rules say, for
any small layout. Each example builds a pool of its own through the broker (2 to 4 queues with
their priorities, some paused or limited, some holding PENDING and RUNNING runs; up to 12
SCHEDULED runs with their own priorities and scheduled times in the past, ties included), polls
it with a random limit, queue names and time bounds, and compares the answer with `expected`,
a plain reading of docs/protocol.md and BEHAVIOUR §5 (GS-2..GS-6): the eligible runs of the
unpaused queues asked for, at most each queue's free slots, then the pool's, then the limit,
ordered by queue priority, the run's priority, its scheduled time and its id at every cut.

Not generated here: runs a release handed a slot (first in the order; see
test_deployment_slot_leases.py), `in_process` retries and runs of a full deployment (left
out; see test_workers_and_poll.py). The service is shared by the examples: each uses a pool
with a name of its own."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

PER_QUEUE_CAP = PER_POOL_CAP = 1000  # Prefect's internal caps (GS-6)


@dataclass(frozen=True)
class QueueLayout:
    priority: int  # asked for at creation; the pool may move it (a priority taken moves the others)
    paused: bool
    concurrency_limit: int | None
    active: tuple[str, ...]  # PENDING and RUNNING runs holding its slots


@dataclass(frozen=True)
class RunLayout:
    queue: int  # index into the queues
    priority: int
    minutes_ago: int  # few distinct values, so that scheduled times tie and ids decide


@dataclass(frozen=True)
class PollLayout:
    queues: tuple[QueueLayout, ...]  # the pool's `default` queue is the first
    pool_paused: bool
    pool_limit: int | None
    runs: tuple[RunLayout, ...]
    limit: int
    queue_names: tuple[int, ...] | None  # which queues the poll names (None: all)
    after_minutes_ago: int | None  # `scheduled_after`, inclusive
    before_minutes_ago: int | None  # `scheduled_before`, inclusive


@st.composite
def layouts(draw) -> PollLayout:
    n = draw(st.integers(min_value=2, max_value=4))
    priorities = draw(st.lists(st.integers(min_value=1, max_value=9), min_size=n, max_size=n, unique=True))
    queues = tuple(QueueLayout(
        priority=p,
        paused=draw(st.sampled_from([False, False, False, False, True])),
        concurrency_limit=draw(st.sampled_from([None, None, None, 0, 1, 2, 3, 4])),
        active=tuple(draw(st.lists(st.sampled_from(["PENDING", "RUNNING"]), max_size=2))),
    ) for p in priorities)
    runs = tuple(draw(st.lists(st.builds(
        RunLayout, queue=st.integers(min_value=0, max_value=n - 1), priority=st.integers(min_value=-2, max_value=2),
        minutes_ago=st.integers(min_value=1, max_value=5)), min_size=draw(st.sampled_from([0, 6, 6])), max_size=12)))
    names = draw(st.none() | st.none() | st.lists(st.integers(min_value=0, max_value=n - 1), min_size=1, max_size=n,
                                                   unique=True))
    return PollLayout(
        queues=queues,
        pool_paused=draw(st.sampled_from([False] * 7 + [True])),
        pool_limit=draw(st.sampled_from([None, None, None, *range(11)])),
        runs=runs,
        limit=draw(st.sampled_from([14, 14, 14, *range(14)])),
        queue_names=tuple(names) if names is not None else None,
        # Mostly unbounded, and bounds that leave some runs in: the window's edges hold ties.
        after_minutes_ago=draw(st.sampled_from([None, None, None, None, 3, 4, 5])),
        before_minutes_ago=draw(st.sampled_from([None, None, None, None, 1, 2, 3])),
    )


@dataclass(frozen=True)
class Scheduled:
    id: str
    queue: int
    priority: int
    at: datetime


def expected(layout: PollLayout, queue_priorities: list[int], runs: list[Scheduled], now: datetime) -> list[str]:
    """The documented poll, written plainly: which runs, in which order."""
    if layout.pool_paused:
        return []
    asked = layout.queue_names if layout.queue_names is not None else range(len(layout.queues))
    eligible = [i for i in asked if not layout.queues[i].paused]
    after = now - timedelta(minutes=layout.after_minutes_ago) if layout.after_minutes_ago is not None else None
    before = now - timedelta(minutes=layout.before_minutes_ago) if layout.before_minutes_ago is not None else None

    def order(run: Scheduled) -> tuple[int, int, datetime, str]:
        return queue_priorities[run.queue], run.priority, run.at, run.id

    chosen: list[Scheduled] = []
    for i in eligible:
        queue = layout.queues[i]
        in_time = [r for r in runs if r.queue == i and (after is None or r.at >= after)
                   and (before is None or r.at <= before)]
        room = PER_QUEUE_CAP
        if queue.concurrency_limit is not None:
            room = min(room, max(0, queue.concurrency_limit - len(queue.active)))
        chosen += sorted(in_time, key=order)[:room]
    pool_room = PER_POOL_CAP
    if layout.pool_limit is not None:
        # The pool's slots are those its unpaused queues' runs hold, asked for or not.
        held = sum(len(q.active) for q in layout.queues if not q.paused)
        pool_room = min(pool_room, max(0, layout.pool_limit - held))
    return [r.id for r in sorted(chosen, key=order)[:pool_room][:layout.limit]]


async def build_and_poll(broker, flow_id: str, layout: PollLayout) -> tuple[list[str], list[str]]:
    """The layout made through the broker in a pool of its own, polled: (answer, expected).
    Active runs first and limits and pauses last, so that no limit refuses what the layout
    holds."""
    pool = f"p-{uuid.uuid4().hex[:12]}"
    names = ["default"] + [f"q{i}" for i in range(1, len(layout.queues))]
    await broker.ok_cmd("CreateWorkPool", name=pool, type="process")
    await broker.ok_cmd("UpdateWorkQueue", work_pool_name=pool, work_queue_name="default",
                        priority=layout.queues[0].priority)
    for name, queue in zip(names[1:], layout.queues[1:], strict=True):
        await broker.ok_cmd("CreateWorkQueue", work_pool_name=pool, name=name, priority=queue.priority)

    async def run(queue: int, state: dict, priority: int = 0) -> str:
        return (await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, work_pool_name=pool,
                                    work_queue_name=names[queue], state=state, priority=priority))["id"]

    for i, queue in enumerate(layout.queues):
        for state in queue.active:
            await run(i, {"type": state})
    now = datetime.now(UTC).replace(microsecond=0)
    scheduled = []
    for r in layout.runs:
        at = now - timedelta(minutes=r.minutes_ago)
        state = {"type": "SCHEDULED", "state_details": {"scheduled_time": at.isoformat()}}
        scheduled.append(Scheduled(await run(r.queue, state, r.priority), r.queue, r.priority, at))
    for name, queue in zip(names, layout.queues, strict=True):
        if queue.paused or queue.concurrency_limit is not None:
            await broker.ok_cmd("UpdateWorkQueue", work_pool_name=pool, work_queue_name=name,
                                is_paused=queue.paused, concurrency_limit=queue.concurrency_limit)
    if layout.pool_paused or layout.pool_limit is not None:
        await broker.ok_cmd("UpdateWorkPool", name=pool, is_paused=layout.pool_paused,
                            concurrency_limit=layout.pool_limit)

    # The priorities the pool settled on (a priority already taken moves the others down).
    priority_of = {q["name"]: q["priority"] for q in await broker.ok_qry("ListWorkQueues", work_pool_name=pool)}
    body: dict = {"limit": layout.limit}
    if layout.queue_names is not None:
        body["work_queue_names"] = [names[i] for i in layout.queue_names]
    if layout.after_minutes_ago is not None:
        body["scheduled_after"] = (now - timedelta(minutes=layout.after_minutes_ago)).isoformat()
    if layout.before_minutes_ago is not None:
        body["scheduled_before"] = (now - timedelta(minutes=layout.before_minutes_ago)).isoformat()
    answer = await broker.ok_qry("GetScheduledFlowRuns", work_pool_name=pool, **body)
    return ([item["flow_run"]["id"] for item in answer],
            expected(layout, [priority_of[name] for name in names], scheduled, now))


def _q(priority: int, paused: bool = False, concurrency_limit: int | None = None, active: tuple[str, ...] = ()):
    return QueueLayout(priority, paused, concurrency_limit, active)


def _runs(*runs: tuple[int, int, int]) -> tuple[RunLayout, ...]:
    return tuple(RunLayout(*r) for r in runs)


# Postgres's Prefect: the runs of a paused queue leave the pool's slots to the poll.
PAUSED_QUEUE_HOLDS_NO_POOL_SLOT = PollLayout(
    queues=(_q(1, paused=True, active=("RUNNING", "RUNNING")), _q(2)), pool_paused=False, pool_limit=3,
    runs=_runs((1, 0, 1), (1, 0, 2), (1, 0, 3), (1, 0, 4), (0, 0, 5)), limit=14, queue_names=None,
    after_minutes_ago=None, before_minutes_ago=None)
# Every cut at once: queue priorities apart from creation order, a queue's free slots, run
# priorities against scheduled times, tied times, both time bounds, the pool's slots, the limit.
EVERY_CUT = PollLayout(
    queues=(_q(3, active=("PENDING",)), _q(1, concurrency_limit=3, active=("RUNNING",)), _q(2)),
    pool_paused=False, pool_limit=9,
    runs=_runs((0, 0, 2), (0, -1, 3), (1, -1, 2), (1, 0, 4), (1, 0, 3), (1, 0, 3), (2, 0, 2), (2, 0, 2),
               (2, -2, 5), (2, 1, 1), (0, 0, 1)),
    limit=7, queue_names=None, after_minutes_ago=4, before_minutes_ago=2)


@settings(max_examples=15, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=layouts())
@example(layout=PAUSED_QUEUE_HOLDS_NO_POOL_SLOT)
@example(layout=EVERY_CUT)
async def test_the_pool_poll_answers_in_the_documented_order_within_its_limits(broker, layout):
    # The service and broker fixtures are shared by the examples: each builds its own pool.
    flow_id = (await broker.ok_cmd("CreateFlow", name="etl"))["id"]
    answer, wanted = await build_and_poll(broker, flow_id, layout)
    assert answer == wanted, layout

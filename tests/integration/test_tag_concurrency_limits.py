"""Task tag concurrency limits through the broker, against real NATS and Postgres: create (an
upsert by tag), read, list, reset and delete; task runs taking a tag's slots at RUNNING and
giving them back (SL-8, OR-17, OR-18), seen in the read model; the foreman crashing the task
runs left running in a flow run that ended, which gives their slots back; bad input is invalid and
appends nothing; two service instances see what the other wrote to a limit; and 16 runs racing for a tag limited to 3 over two service instances never
hold more than 3 slots, as the log shows."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from typer.testing import CliRunner

from runledger.cli.main import _register, app
from runledger.client import NotFound, RunledgerClient, TagConcurrencyLimit
from runledger.commands import tag_concurrency_limits as tcl
from runledger.handlers.background import CommandSender
from runledger.handlers.foreman import ENDED_FLOW_RUN_GRACE_SECONDS, Foreman
from runledger.infra.event_store import EventStore
from runledger.infra.nats_connection import connect
from tests.integration.broker import assert_live_equals_rebuild, cli_env


async def test_a_tag_limit_is_created_updated_read_listed_reset_and_deleted(service, settings):
    async with RunledgerClient(settings) as rl:
        limit, created = await rl.create_tag_concurrency_limit("db", 2)
        assert created is True and isinstance(limit, TagConcurrencyLimit)
        assert (limit.tag, limit.concurrency_limit, limit.active_slots) == ("db", 2, [])
        assert await rl.read_tag_concurrency_limit("db") == limit

        again, created = await rl.create_tag_concurrency_limit("db", 3)  # an upsert by tag
        assert created is False and again.id == limit.id and again.concurrency_limit == 3
        same, created = await rl.create_tag_concurrency_limit("db", 3)
        assert created is False and same == again
        assert (await rl.read_tag_concurrency_limit("db")).concurrency_limit == 3

        for tag in ("web", "api", "zz"):
            await rl.create_tag_concurrency_limit(tag, 1)
        assert [x.tag for x in await rl.list_tag_concurrency_limits()] == ["api", "db", "web", "zz"]
        assert [x.tag for x in await rl.list_tag_concurrency_limits(limit=2, offset=1)] == ["db", "web"]
        assert await rl.list_tag_concurrency_limits(limit=0) == []

        holders = [uuid.uuid4(), uuid.uuid4()]
        reset = await rl.reset_tag_concurrency_limit("db", holders)
        assert reset.active_slots == holders and (await rl.read_tag_concurrency_limit("db")).active_slots == holders
        assert (await rl.reset_tag_concurrency_limit("db")).active_slots == []

        await rl.delete_tag_concurrency_limit("db")
        for call in (rl.read_tag_concurrency_limit("db"), rl.delete_tag_concurrency_limit("db"),
                     rl.reset_tag_concurrency_limit("db")):
            with pytest.raises(NotFound, match="Concurrency limit not found"):
                await call
        fresh, created = await rl.create_tag_concurrency_limit("db", 1)
        assert created is True and fresh.id != limit.id  # a new limit
        assert await rl.read_tag_concurrency_limit("db") == fresh
    await assert_live_equals_rebuild(service, settings)


async def test_runs_take_a_tags_slots_at_running_wait_while_it_is_full_and_give_them_back(service, settings):
    async with RunledgerClient(settings) as rl:
        await rl.create_tag_concurrency_limit("db", 1)
        await rl.create_tag_concurrency_limit("api", 5)
        first, _ = await rl.create_task_run("query", "1", tags=["db", "api", "unlimited"])
        second, _ = await rl.create_task_run("query", "2", tags=["db"])

        assert (await rl.set_task_run_state(first.id, "RUNNING")).accepted
        assert (await rl.read_tag_concurrency_limit("db")).active_slots == [first.id]
        assert (await rl.read_tag_concurrency_limit("api")).active_slots == [first.id]

        waiting = await rl.set_task_run_state(second.id, "RUNNING")
        assert waiting.status == "WAIT" and waiting.details.delay_seconds == 10
        assert waiting.details.reason == "Concurrency limit for the db tag has been reached"
        assert waiting.state is not None and waiting.state.type == "PENDING"
        assert (await rl.read_task_run(second.id)).state_type == "PENDING"

        # The holder may enter RUNNING again: it keeps its one slot, and does not wait on itself.
        assert (await rl.set_task_run_state(first.id, "RUNNING")).accepted
        assert (await rl.read_tag_concurrency_limit("db")).active_slots == [first.id]

        assert (await rl.set_task_run_state(first.id, "COMPLETED")).accepted
        assert (await rl.read_tag_concurrency_limit("db")).active_slots == []
        assert (await rl.read_tag_concurrency_limit("api")).active_slots == []
        assert (await rl.set_task_run_state(second.id, "RUNNING")).accepted
        assert (await rl.read_tag_concurrency_limit("db")).active_slots == [second.id]

        # A forced state gives the slot back too; a deleted run gives it back.
        assert (await rl.set_task_run_state(second.id, "FAILED", force=True)).accepted
        assert (await rl.read_tag_concurrency_limit("db")).active_slots == []
        assert (await rl.set_task_run_state(second.id, "RUNNING")).accepted
        await rl.delete_task_run(second.id)
        assert (await rl.read_tag_concurrency_limit("db")).active_slots == []

        await rl.create_tag_concurrency_limit("never", 0)
        stuck, _ = await rl.create_task_run("query", "3", tags=["never"])
        aborted = await rl.set_task_run_state(stuck.id, "RUNNING")
        assert aborted.status == "ABORT" and aborted.details.reason == (
            'The concurrency limit on tag "never" is 0 and will deadlock if the task tries to run again.')
        assert (await rl.read_task_run(stuck.id)).state_type == "PENDING"
    await assert_live_equals_rebuild(service, settings)


@pytest.mark.parametrize("name, body, field", [
    ("CreateTagConcurrencyLimit", {"tag": "db", "concurrency_limit": -1}, "concurrency_limit"),
    ("CreateTagConcurrencyLimit", {"tag": "db", "concurrency_limit": "1"}, "concurrency_limit"),
    ("CreateTagConcurrencyLimit", {"tag": "db"}, "concurrency_limit"),
    ("CreateTagConcurrencyLimit", {"concurrency_limit": 1}, "tag"),
    ("CreateTagConcurrencyLimit", {"tag": "x" * 256, "concurrency_limit": 1}, "tag"),
    ("CreateTagConcurrencyLimit", {"tag": "db\u0000", "concurrency_limit": 1}, "tag"),
    ("CreateTagConcurrencyLimit", {"tag": "db", "concurrency_limit": 1, "active_slots": []}, "active_slots"),
    ("ResetTagConcurrencyLimit", {"tag": "db", "slot_override": ["not-a-uuid"]}, "slot_override.0"),
    ("ResetTagConcurrencyLimit", {"tag": "db", "slot_override": [str(uuid.UUID(int=i)) for i in range(1001)]},
     "slot_override"),
    ("DeleteTagConcurrencyLimit", {}, "tag"),
    ("DeleteTagConcurrencyLimit", {"tag": 5}, "tag"),
])
async def test_bad_tag_limit_commands_are_invalid_and_append_nothing(broker, name, body, field):
    await broker.ok_cmd("CreateTagConcurrencyLimit", tag="db", concurrency_limit=2)
    before = await broker.stream_messages()
    reply = await broker.cmd(name, **body)
    assert reply["ok"] is False and reply["error"]["code"] == "invalid", reply
    assert reply["error"]["field"] == field
    assert await broker.stream_messages() == before
    assert (await broker.ok_qry("GetTagConcurrencyLimit", tag="db"))["concurrency_limit"] == 2


@pytest.mark.parametrize("name, body, field", [
    ("GetTagConcurrencyLimit", {}, "tag"),
    ("GetTagConcurrencyLimit", {"tag": None}, "tag"),
    ("ListTagConcurrencyLimits", {"limit": 201}, "limit"),
    ("ListTagConcurrencyLimits", {"offset": -1}, "offset"),
])
async def test_bad_tag_limit_queries_are_invalid(broker, name, body, field):
    reply = await broker.qry(name, **body)
    assert reply["ok"] is False and reply["error"]["code"] == "invalid", reply
    assert reply["error"]["field"] == field


# ---------------------------------------------------------------------------------------------
# Two instances, each with its own cache


async def test_an_instance_sees_a_limit_or_a_slot_another_instance_wrote(service, settings, second_instance):
    """Instance B knows the tag without a limit, then A limits it; A knows the limit without
    the slot B's run took, and not the run (made on B), so finds it RUNNING in the log. Neither
    would write to the limit from what it cached: each reads it again, so B's run takes the
    slot and A's release of it is not lost."""
    a, b = service.commands, second_instance.commands

    async def on(bus: Any, name: str, **body: Any) -> dict[str, Any]:
        reply = await bus.execute(name, json.dumps(body, default=str).encode())
        assert reply["ok"], reply
        return reply

    async def slots() -> list[str]:
        last = await service.store.last_event("tag_concurrency_limit", tcl.limit_id("t"))
        return last.envelope.payload["limit"]["active_slots"]

    first = (await on(a, "CreateTaskRun", task_key="k", dynamic_key="1", tags=["t"]))["result"]["id"]
    second = (await on(b, "CreateTaskRun", task_key="k", dynamic_key="2", tags=["t"]))["result"]["id"]
    for state in ("RUNNING", "COMPLETED"):  # B caches that "t" has no limit
        await on(b, "SetTaskRunState", id=first, state={"type": state})
    await on(a, "CreateTagConcurrencyLimit", tag="t", concurrency_limit=1)

    assert (await on(b, "SetTaskRunState", id=second, state={"type": "RUNNING"}))["orchestration"]["status"] == "ACCEPT"
    assert await slots() == [second]
    await on(a, "SetTaskRunState", id=second, state={"type": "COMPLETED"})  # A cached the limit empty
    assert await slots() == []
    rerun = await on(b, "SetTaskRunState", id=first, state={"type": "RUNNING"})  # B cached it full
    assert rerun["orchestration"]["status"] == "ACCEPT" and await slots() == [first]


async def test_an_instance_sees_a_global_tag_limit_or_its_slot_another_instance_wrote(service, settings,
                                                                                       second_instance):
    """As above, for a global limit `tag:g`: B caches that no such limit exists, A creates it;
    B's run then takes its slot, and A, which cached no holder, still gives it back."""
    a, b = service.commands, second_instance.commands

    async def on(bus: Any, _name: str, /, **body: Any) -> dict[str, Any]:
        reply = await bus.execute(_name, json.dumps(body, default=str).encode())
        assert reply["ok"], reply
        return reply

    first = (await on(a, "CreateTaskRun", task_key="k", dynamic_key="1", tags=["g"]))["result"]["id"]
    second = (await on(b, "CreateTaskRun", task_key="k", dynamic_key="2", tags=["g"]))["result"]["id"]
    for state in ("RUNNING", "COMPLETED"):  # B caches that "tag:g" names no limit
        await on(b, "SetTaskRunState", id=first, state={"type": state})
    limit_id = (await on(a, "CreateConcurrencyLimit", name="tag:g", limit=1))["result"]["id"]

    async def taken() -> int:
        last = await service.store.last_event("concurrency_limit", limit_id)
        return last.envelope.payload["limit"]["active_slots"]

    third = (await on(a, "CreateTaskRun", task_key="k", dynamic_key="3", tags=["g"]))["result"]["id"]
    for state in ("RUNNING", "COMPLETED"):  # A caches the limit without holders
        await on(a, "SetTaskRunState", id=third, state={"type": state})
    assert (await on(b, "SetTaskRunState", id=second, state={"type": "RUNNING"}))["orchestration"]["status"] == "ACCEPT"
    assert await taken() == 1
    full = await on(b, "SetTaskRunState", id=first, state={"type": "RUNNING"})
    assert full["orchestration"]["status"] == "WAIT"
    await on(a, "SetTaskRunState", id=second, state={"type": "COMPLETED"})
    assert await taken() == 0
    assert (await on(b, "SetTaskRunState", id=first, state={"type": "RUNNING"}))["orchestration"]["status"] == "ACCEPT"


async def _events_of(service: Any, settings: Any, task_run_id: Any) -> list[str]:
    """The event types of one task run's subject, in log order."""
    rows = await service.store.read_subject(f"{settings.event_subject_prefix}.task_run.{task_run_id}.*")
    return [subject.rsplit(".", 1)[1] for _, subject, _, _ in sorted(rows, key=lambda r: r[0])]


async def test_a_task_run_held_back_by_its_tag_says_why_it_waits_until_it_runs(service, settings):
    """A run told to WAIT by its tag's limit records why (once, however often its worker asks
    again): its reply, the listing and `task-run inspect` show it; a global `tag:<tag>` limit's
    reason replaces it; the state written when it finally runs clears it."""
    _register()
    env, runner = cli_env(settings), CliRunner()

    async def inspect(run_id: Any) -> str:
        shown = await asyncio.to_thread(runner.invoke, app, ["task-run", "inspect", str(run_id)], env=env)
        assert shown.exit_code == 0, shown.output
        return shown.stdout

    async with RunledgerClient(settings) as rl:
        await rl.create_tag_concurrency_limit("db", 1)
        holder, _ = await rl.create_task_run("query", "1", tags=["db"])
        waiter, _ = await rl.create_task_run("query", "2", tags=["db"])
        assert (await rl.set_task_run_state(holder.id, "RUNNING")).accepted
        assert (await rl.read_task_run(holder.id)).waiting_reason is None

        for _ in range(3):  # a worker proposing the run again after each wait
            waiting = await rl.set_task_run_state(waiter.id, "RUNNING")
            assert waiting.status == "WAIT"
        reason = "Concurrency limit for the db tag has been reached"
        read = await rl.read_task_run(waiter.id)
        assert (read.state_type, read.waiting_reason) == ("PENDING", reason)
        assert [r.waiting_reason for r in await rl.list_task_runs(ids=[waiter.id])] == [reason]
        assert await _events_of(service, settings, waiter.id) == ["TaskRunCreated", "TaskRunWaiting"]
        assert f"Waiting: {reason}\n" in await inspect(waiter.id)

        await rl.create_concurrency_limit("tag:db", 1)  # now the tag's limit, held by no one
        other, _ = await rl.create_task_run("query", "3", tags=["db"])
        assert (await rl.set_task_run_state(other.id, "RUNNING")).accepted
        assert (await rl.set_task_run_state(waiter.id, "RUNNING")).status == "WAIT"
        assert (await rl.read_task_run(waiter.id)).waiting_reason == "Concurrency limit reached for tags: db"

        assert (await rl.set_task_run_state(other.id, "COMPLETED")).accepted
        assert (await rl.set_task_run_state(waiter.id, "RUNNING")).accepted
        ran = await rl.read_task_run(waiter.id)
        assert (ran.state_type, ran.waiting_reason) == ("RUNNING", None)
        assert "Waiting:" not in await inspect(waiter.id)
        assert await _events_of(service, settings, waiter.id) == [
            "TaskRunCreated", "TaskRunWaiting", "TaskRunWaiting", "TaskRunStateSet"]
    await assert_live_equals_rebuild(service, settings)


# ---------------------------------------------------------------------------------------------
# A race

RUNS = 16
LIMIT = 3


async def _cmd(nc: Any, settings: Any, name: str, body: dict[str, Any]) -> dict[str, Any]:
    reply = await nc.request(settings.command_subject(name), json.dumps(body).encode(), timeout=30)
    out = json.loads(reply.data)
    assert out["ok"], out
    return out


async def _events_in_log_order(settings: Any, aggregate_type: str) -> list[dict[str, Any]]:
    nc = await connect(settings)
    try:
        rows = await EventStore(nc, settings).read_subject(f"{settings.event_subject_prefix}.{aggregate_type}.*.*")
    finally:
        await nc.close()
    return [json.loads(data) for _, _, data, _ in sorted(rows, key=lambda r: r[0])]


async def test_16_runs_racing_for_a_tag_limited_to_3_never_hold_more_than_3_slots(broker, settings, second_instance):
    await broker.ok_cmd("CreateTagConcurrencyLimit", tag="shared", concurrency_limit=LIMIT)
    run_ids = [(await broker.ok_cmd("CreateTaskRun", task_key="raced", dynamic_key=str(i), tags=["shared"]))["id"]
               for i in range(RUNS)]
    conns = [await connect(settings) for _ in range(4)]  # the two instances share the requests
    outcomes: Counter = Counter()
    try:
        first = await asyncio.gather(*(_cmd(conns[i % 4], settings, "SetTaskRunState",
                                            {"id": run_id, "state": {"type": "RUNNING"}})
                                       for i, run_id in enumerate(run_ids)))
        statuses = Counter(reply["orchestration"]["status"] for reply in first)
        assert statuses == {"ACCEPT": LIMIT, "WAIT": RUNS - LIMIT}
        assert all(r["orchestration"]["details"]["delay_seconds"] == 10 for r in first
                   if r["orchestration"]["status"] == "WAIT")
        started = {run_id for run_id, r in zip(run_ids, first, strict=True)
                   if r["orchestration"]["status"] == "ACCEPT"}

        async def runner(i: int, run_id: str) -> None:
            rng = random.Random(i)
            nc = conns[i % 4]
            running = run_id in started
            while not running:  # the test tries again at once rather than after 10 s
                await asyncio.sleep(rng.uniform(0, 0.02))
                reply = await _cmd(nc, settings, "SetTaskRunState", {"id": run_id, "state": {"type": "RUNNING"}})
                outcomes[reply["orchestration"]["status"]] += 1
                running = reply["orchestration"]["status"] == "ACCEPT"
            await asyncio.sleep(rng.uniform(0, 0.02))
            done = await _cmd(nc, settings, "SetTaskRunState", {"id": run_id, "state": {"type": "COMPLETED"}})
            assert done["orchestration"]["status"] == "ACCEPT", done

        await asyncio.wait_for(asyncio.gather(*(runner(i, r) for i, r in enumerate(run_ids))), 120)
    finally:
        for nc in conns:
            await nc.close()
    assert outcomes["ACCEPT"] == RUNS - LIMIT and set(outcomes) <= {"ACCEPT", "WAIT"}

    # The limit's own events: never more than 3 holders; each run took one slot and gave it back.
    limit_events = await _events_in_log_order(settings, "tag_concurrency_limit")
    holders = [e["payload"]["limit"]["active_slots"] for e in limit_events]
    assert max(len(h) for h in holders) == LIMIT and holders[-1] == []
    taken = Counter(e["payload"]["task_run_id"] for e in limit_events if e["type"] == "TagConcurrencyLimitSlotTaken")
    released = Counter(e["payload"]["task_run_id"] for e in limit_events
                       if e["type"] == "TagConcurrencyLimitSlotReleased")
    assert taken == released == Counter(run_ids)
    # The runs' own states, in log order: never more than 3 RUNNING at once.
    running: set[str] = set()
    most = 0
    for e in await _events_in_log_order(settings, "task_run"):
        run = e["payload"]["run"]
        (running.add if run["state_type"] == "RUNNING" else running.discard)(run["id"])
        most = max(most, len(running))
    assert most == LIMIT and running == set()
    await broker.catch_up()  # the runs' writes went through other connections than the broker's
    limit = await broker.ok_qry("GetTagConcurrencyLimit", tag="shared")
    assert limit["active_slots"] == []
    await assert_live_equals_rebuild(second_instance, settings)


# ---------------------------------------------------------------------------------------------
# The foreman: task runs left running in a flow run that ended give their slots back


async def _foreman_pass(broker, service, settings, after_seconds: float) -> int:
    """One foreman pass, its clock `after_seconds` ahead, once the read models hold every
    command sent so far; the task runs it crashed. Later queries wait for its writes too."""
    await broker.ok_qry("CountTaskRuns")
    when = datetime.now(UTC) + timedelta(seconds=after_seconds)
    nc = await connect(settings)
    try:
        crashed = (await Foreman(service.engine, CommandSender(nc, settings), clock=lambda: when).run_pass()
                   ).task_runs_crashed
    finally:
        await nc.close()
    broker.last_seq = (await broker.nc.jetstream().stream_info(settings.stream_name)).state.last_seq
    return crashed


async def test_a_tag_slot_of_a_dead_task_run_is_released(broker, service, settings):
    """The auditor's case: the only `db` slot held by a task run whose flow run was crashed
    (its process died) is given back at the foreman's first pass past the grace."""
    await broker.ok_cmd("CreateTagConcurrencyLimit", tag="db", concurrency_limit=1)
    flow_id = (await broker.ok_cmd("CreateFlow", name="f"))["id"]
    fr = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, state={"type": "RUNNING"})
    t1 = await broker.ok_cmd("CreateTaskRun", flow_run_id=fr["id"], task_key="k", dynamic_key="1", tags=["db"])
    assert (await broker.cmd("SetTaskRunState", id=t1["id"], state={"type": "RUNNING"}))["orchestration"]["status"] == "ACCEPT"
    await broker.ok_cmd("SetFlowRunState", id=fr["id"], state={"type": "CRASHED"}, force=True)
    assert await _foreman_pass(broker, service, settings, ENDED_FLOW_RUN_GRACE_SECONDS + 1) == 1

    dead = await broker.ok_qry("GetTaskRun", id=t1["id"])
    assert dead["state_type"] == "CRASHED"
    assert dead["state"]["message"] == "Its flow run ended (CRASHED) while this task run was still running."
    assert (await broker.ok_qry("GetTagConcurrencyLimit", tag="db"))["active_slots"] == []
    fr2 = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, state={"type": "RUNNING"})
    t2 = await broker.ok_cmd("CreateTaskRun", flow_run_id=fr2["id"], task_key="k", dynamic_key="2", tags=["db"])
    r2 = await broker.cmd("SetTaskRunState", id=t2["id"], state={"type": "RUNNING"})
    assert r2["orchestration"]["status"] == "ACCEPT"   # before the fix: WAIT, the dead run still in active_slots

    # A second pass (or a second foreman) finds nothing: t1 ended, t2's flow run runs.
    assert await _foreman_pass(broker, service, settings, ENDED_FLOW_RUN_GRACE_SECONDS + 1) == 0
    assert (await broker.ok_qry("GetTagConcurrencyLimit", tag="db"))["active_slots"] == [t2["id"]]
    assert (await broker.ok_qry("GetTaskRun", id=t2["id"]))["state_type"] == "RUNNING"
    await assert_live_equals_rebuild(service, settings)


async def test_the_foreman_leaves_task_runs_of_running_flow_runs_and_of_runs_just_ended(broker, service, settings):
    """A task run whose flow run still runs is its process's to end; one whose flow run ended
    within the grace may still be reporting its outcome. Neither is touched until the flow run
    ended longer ago than the grace; a CANCELLING one is crashed too, and a finished one never."""
    await broker.ok_cmd("CreateTagConcurrencyLimit", tag="db", concurrency_limit=5)
    flow_id = (await broker.ok_cmd("CreateFlow", name="f"))["id"]
    live = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, state={"type": "RUNNING"})
    ended = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, state={"type": "RUNNING"})

    async def running(flow_run_id: str, key: str) -> str:
        run = await broker.ok_cmd("CreateTaskRun", flow_run_id=flow_run_id, task_key="k", dynamic_key=key, tags=["db"])
        reply = await broker.cmd("SetTaskRunState", id=run["id"], state={"type": "RUNNING"})
        assert reply["orchestration"]["status"] == "ACCEPT", reply
        return run["id"]

    alive = await running(live["id"], "alive")
    orphan = await running(ended["id"], "orphan")
    cancelling = await running(ended["id"], "cancelling")
    await broker.ok_cmd("SetTaskRunState", id=cancelling, state={"type": "CANCELLING"})
    finished = await running(ended["id"], "finished")
    await broker.ok_cmd("SetTaskRunState", id=finished, state={"type": "COMPLETED"})
    await broker.ok_cmd("SetFlowRunState", id=ended["id"], state={"type": "FAILED"}, force=True)

    # Within the grace: nothing, and not far past the flow run's end either.
    assert await _foreman_pass(broker, service, settings, 0) == 0
    assert await _foreman_pass(broker, service, settings, ENDED_FLOW_RUN_GRACE_SECONDS - 5) == 0
    slots = (await broker.ok_qry("GetTagConcurrencyLimit", tag="db"))["active_slots"]
    assert sorted(slots) == sorted([alive, orphan, cancelling])

    assert await _foreman_pass(broker, service, settings, ENDED_FLOW_RUN_GRACE_SECONDS + 1) == 2
    states = {run_id: (await broker.ok_qry("GetTaskRun", id=run_id))["state"]
              for run_id in (alive, orphan, cancelling, finished)}
    assert {run_id: s["type"] for run_id, s in states.items()} == {
        alive: "RUNNING", orphan: "CRASHED", cancelling: "CRASHED", finished: "COMPLETED"}
    assert states[orphan]["message"] == "Its flow run ended (FAILED) while this task run was still running."
    assert (await broker.ok_qry("GetTagConcurrencyLimit", tag="db"))["active_slots"] == [alive]


async def _running(broker, task_run_id: str) -> dict[str, Any]:
    return (await broker.cmd("SetTaskRunState", id=task_run_id, state={"type": "RUNNING"}))["orchestration"]


async def test_a_global_limit_named_tag_holds_task_runs_back_instead_of_the_classic_one(broker, service, settings):
    """A global limit `tag:<tag>`, while active, limits the tag's task runs: a full one makes
    the next run wait (a short random delay), 0 aborts, the tag's classic limit is ignored
    meanwhile, and a run leaving RUNNING gives its slot back."""
    await broker.ok_cmd("CreateTagConcurrencyLimit", tag="db", concurrency_limit=0)  # ignored: `tag:db` governs
    await broker.ok_cmd("CreateConcurrencyLimit", name="tag:db", limit=1)
    first = await broker.ok_cmd("CreateTaskRun", task_key="q", dynamic_key="1", tags=["db", "free"])
    second = await broker.ok_cmd("CreateTaskRun", task_key="q", dynamic_key="2", tags=["db"])

    assert (await _running(broker, first["id"]))["status"] == "ACCEPT"
    assert (await broker.ok_qry("GetConcurrencyLimitByName", name="tag:db"))["active_slots"] == 1
    assert (await broker.ok_qry("GetTagConcurrencyLimit", tag="db"))["active_slots"] == []
    assert (await _running(broker, first["id"]))["status"] == "ACCEPT"  # a holder running again keeps its one slot
    assert (await broker.ok_qry("GetConcurrencyLimitByName", name="tag:db"))["active_slots"] == 1

    waiting = await _running(broker, second["id"])
    assert waiting["status"] == "WAIT" and waiting["details"]["reason"] == "Concurrency limit reached for tags: db"
    assert 1 <= waiting["details"]["delay_seconds"] <= 10
    assert (await broker.ok_qry("GetTaskRun", id=second["id"]))["state_type"] == "PENDING"

    await broker.ok_cmd("SetTaskRunState", id=first["id"], state={"type": "COMPLETED"})
    assert (await broker.ok_qry("GetConcurrencyLimitByName", name="tag:db"))["active_slots"] == 0
    assert (await _running(broker, second["id"]))["status"] == "ACCEPT"
    await broker.ok_cmd("DeleteTaskRun", id=second["id"])  # a deleted run gives its slot back too
    assert (await broker.ok_qry("GetConcurrencyLimitByName", name="tag:db"))["active_slots"] == 0

    # Inactive, it holds nothing back and the classic limit applies again (0: abort).
    await broker.ok_cmd("UpdateConcurrencyLimit", name="tag:db", active=False)
    third = await broker.ok_cmd("CreateTaskRun", task_key="q", dynamic_key="3", tags=["db"])
    classic = await _running(broker, third["id"])
    assert classic["status"] == "ABORT" and "0 and will deadlock" in classic["details"]["reason"]

    await broker.ok_cmd("CreateConcurrencyLimit", name="tag:never", limit=0)
    stuck = await broker.ok_cmd("CreateTaskRun", task_key="q", dynamic_key="4", tags=["never"])
    aborted = await _running(broker, stuck["id"])
    assert aborted["status"] == "ABORT" and aborted["details"]["reason"] == (
        'The concurrency limit on tag "never" is 0 and will deadlock if the task tries to run again.')
    assert (await broker.ok_qry("GetTaskRun", id=stuck["id"]))["state_type"] == "PENDING"
    await assert_live_equals_rebuild(service, settings)


async def _one_running_task_run_gone_with_its_flow_run(broker, alive_tags: list[str]) -> tuple[dict, dict]:
    """Two RUNNING task runs, each of a RUNNING flow run: `gone` (tags db and api), whose flow
    run is then deleted, and `alive` (`alive_tags`)."""
    flow_id = (await broker.ok_cmd("CreateFlow", name="f"))["id"]
    doomed = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, state={"type": "RUNNING"})
    kept = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, state={"type": "RUNNING"})
    gone = await broker.ok_cmd("CreateTaskRun", flow_run_id=doomed["id"], task_key="k", dynamic_key="1",
                               tags=["db", "api"])
    alive = await broker.ok_cmd("CreateTaskRun", flow_run_id=kept["id"], task_key="k", dynamic_key="2", tags=alive_tags)
    assert (await _running(broker, gone["id"]))["status"] == "ACCEPT"
    assert (await _running(broker, alive["id"]))["status"] == "ACCEPT"
    await broker.ok_cmd("DeleteFlowRun", id=doomed["id"])
    return gone, alive


async def test_the_tag_slots_of_task_runs_gone_with_their_flow_run_are_released(broker, service, settings):
    """A flow run deleted while its tasks ran takes them with it: the foreman's
    `ReleaseTagSlotsOfGoneTaskRuns` gives back their slots, classic and global, and keeps
    those of runs still running."""
    await broker.ok_cmd("CreateTagConcurrencyLimit", tag="db", concurrency_limit=2)
    await broker.ok_cmd("CreateConcurrencyLimit", name="tag:api", limit=1)
    gone, alive = await _one_running_task_run_gone_with_its_flow_run(broker, alive_tags=["db"])
    assert set((await broker.ok_qry("GetTagConcurrencyLimit", tag="db"))["active_slots"]) == {gone["id"], alive["id"]}
    assert (await broker.ok_qry("GetConcurrencyLimitByName", name="tag:api"))["active_slots"] == 1
    next_api = await broker.ok_cmd("CreateTaskRun", task_key="k", dynamic_key="3", tags=["api"])
    assert (await _running(broker, next_api["id"]))["status"] == "WAIT"  # the leak

    released = await broker.ok_cmd("ReleaseTagSlotsOfGoneTaskRuns", tag="db", task_run_ids=[gone["id"], alive["id"]])
    assert released == {"released": [gone["id"]]}
    assert (await broker.ok_qry("GetTagConcurrencyLimit", tag="db"))["active_slots"] == [alive["id"]]
    assert (await broker.ok_cmd("ReleaseTagSlotsOfGoneTaskRuns", tag="api")) == {"released": [gone["id"]]}
    assert (await broker.ok_qry("GetConcurrencyLimitByName", name="tag:api"))["active_slots"] == 0
    assert (await _running(broker, next_api["id"]))["status"] == "ACCEPT"
    # Nothing left to release: nothing is written; a running holder keeps its slot.
    before = await broker.stream_messages()
    assert (await broker.ok_cmd("ReleaseTagSlotsOfGoneTaskRuns", tag="api")) == {"released": []}
    assert (await broker.ok_cmd("ReleaseTagSlotsOfGoneTaskRuns", tag="db")) == {"released": []}
    assert await broker.stream_messages() == before
    assert (await broker.ok_qry("GetConcurrencyLimitByName", name="tag:api"))["active_slots"] == 1
    await assert_live_equals_rebuild(service, settings)


async def test_the_foreman_gives_back_the_tag_slots_of_task_runs_gone_with_their_flow_run(broker, service, settings):
    """The foreman finds the slots held by task runs that no longer exist, on classic limits by
    their holders and on `tag:<tag>` ones by their count, and gives them back; a running
    holder's slot stays, and a second pass finds nothing."""
    await broker.ok_cmd("CreateTagConcurrencyLimit", tag="db", concurrency_limit=1)
    await broker.ok_cmd("CreateConcurrencyLimit", name="tag:api", limit=2)
    gone, alive = await _one_running_task_run_gone_with_its_flow_run(broker, alive_tags=["api"])
    waiting = await broker.ok_cmd("CreateTaskRun", task_key="k", dynamic_key="3", tags=["db"])
    assert (await _running(broker, waiting["id"]))["status"] == "WAIT"  # the deleted run's slot
    await broker.catch_up()
    nc = await connect(settings)
    try:
        foreman = Foreman(service.engine, CommandSender(nc, settings))
        assert await foreman.tag_slots_of_gone_task_runs() == 2  # one classic, one global
        await broker.catch_up()
        assert await foreman.tag_slots_of_gone_task_runs() == 0
    finally:
        await nc.close()
    assert (await broker.ok_qry("GetTagConcurrencyLimit", tag="db"))["active_slots"] == []
    assert (await broker.ok_qry("GetConcurrencyLimitByName", name="tag:api"))["active_slots"] == 1  # alive's
    assert (await _running(broker, waiting["id"]))["status"] == "ACCEPT"
    await assert_live_equals_rebuild(service, settings)


async def test_a_subflow_state_copied_onto_its_parent_task_run_gives_its_global_tag_slot_back(broker, service,
                                                                                                settings):
    await broker.ok_cmd("CreateConcurrencyLimit", name="tag:api", limit=1)
    flow_id = (await broker.ok_cmd("CreateFlow", name="f"))["id"]
    parent = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, state={"type": "RUNNING"})
    task = await broker.ok_cmd("CreateTaskRun", flow_run_id=parent["id"], task_key="k", dynamic_key="0", tags=["api"])
    assert (await _running(broker, task["id"]))["status"] == "ACCEPT"
    assert (await broker.ok_qry("GetConcurrencyLimitByName", name="tag:api"))["active_slots"] == 1
    await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, parent_task_run_id=task["id"])  # copies PENDING onto it
    assert (await broker.ok_qry("GetTaskRun", id=task["id"]))["state_type"] == "PENDING"
    assert (await broker.ok_qry("GetConcurrencyLimitByName", name="tag:api"))["active_slots"] == 0
    await assert_live_equals_rebuild(service, settings)

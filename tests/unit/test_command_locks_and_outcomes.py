"""The command bus's lock sets and decision outcomes, without I/O: the handlers here decide
nothing that would be appended (no events), so no store is needed."""

from __future__ import annotations

import asyncio

import pytest

from runledger.commands import work_pools as wp
from runledger.commands.decisions import Decision, Orchestration, Outcome
from runledger.handlers.command_bus import CommandBus, CommandSpec


def _bus(handle, locks) -> CommandBus:
    return CommandBus(store=None, repo=None, specs={
        "DeletePool": CommandSpec(wp.DeleteWorkPool, handle, lambda r: r, locks)})


def _recording():
    """A handler that records how many run at once, per lock set, while it waits a little."""
    running: list[str] = []
    overlaps: list[tuple[str, ...]] = []

    async def handle(unit, cmd, ctx):
        running.append(cmd.name)
        overlaps.append(tuple(sorted(running)))
        await asyncio.sleep(0.01)
        running.remove(cmd.name)
        return Decision(events=[], result=cmd.name)

    return handle, overlaps


def _locks_of(sets: dict[str, list[tuple[str, str]]]):
    return lambda cmd: sets[cmd.name]


async def test_commands_sharing_an_aggregate_run_one_at_a_time_and_others_run_beside_them():
    handle, overlaps = _recording()
    sets = {"a": [("pool", "1"), ("slots", "1")], "b": [("slots", "1"), ("pool", "2")], "c": [("pool", "3")]}
    bus = _bus(handle, _locks_of(sets))
    replies = await asyncio.gather(*(bus.execute("DeletePool", f'{{"name": "{n}"}}'.encode()) for n in "abc"))
    assert [r["result"] for r in replies] == ["a", "b", "c"]
    assert not any({"a", "b"} <= set(o) for o in overlaps)  # they share ("slots", "1")
    assert any({"a", "c"} <= set(o) or {"b", "c"} <= set(o) for o in overlaps)  # "c" shares nothing
    assert bus._locks == {} and bus._lock_users == {}  # nothing left behind


async def test_overlapping_lock_sets_given_in_opposite_orders_never_deadlock():
    handle, _ = _recording()
    sets = {f"x{i}": ([("a", "1"), ("b", "1")] if i % 2 else [("b", "1"), ("a", "1")]) for i in range(20)}
    bus = _bus(handle, _locks_of(sets))
    async with asyncio.timeout(5):
        replies = await asyncio.gather(*(bus.execute("DeletePool", f'{{"name": "x{i}"}}'.encode()) for i in range(20)))
    assert all(r["ok"] for r in replies)


async def test_a_command_cancelled_while_it_waits_for_a_lock_leaves_no_lock_behind():
    handle, _ = _recording()
    bus = _bus(handle, lambda cmd: [("a", "1"), ("b", "1")])
    first = asyncio.create_task(bus.execute("DeletePool", b'{"name": "one"}'))
    await asyncio.sleep(0)
    second = asyncio.create_task(bus.execute("DeletePool", b'{"name": "two"}'))
    await asyncio.sleep(0.001)
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    assert (await first)["ok"]
    assert bus._locks == {} and bus._lock_users == {}


async def test_an_orchestration_outcome_reaches_the_reply_beside_the_result():
    async def handle(unit, cmd, ctx):
        return Decision(events=[], result={"state": None},
                        orchestration=Orchestration(Outcome.WAIT, reason="pool limit 5 reached", delay_seconds=10))

    reply = await _bus(handle, lambda cmd: []).execute("DeletePool", b'{"name": "p"}')
    assert reply["ok"] is True and reply["result"] == {"state": None}
    assert reply["orchestration"] == {"status": "WAIT", "details": {"reason": "pool limit 5 reached", "delay_seconds": 10}}


async def test_a_plain_decision_has_no_orchestration_in_its_reply():
    async def handle(unit, cmd, ctx):
        return Decision(events=[], result=1)

    reply = await _bus(handle, lambda cmd: []).execute("DeletePool", b'{"name": "p"}')
    assert reply["ok"] is True and "orchestration" not in reply


@pytest.mark.parametrize("kwargs", [{"status": Outcome.WAIT}, {"status": Outcome.REJECT}, {"status": Outcome.ABORT}])
def test_an_outcome_that_needs_a_reason_or_a_delay_cannot_be_made_without_it(kwargs):
    with pytest.raises(ValueError):
        Orchestration(**kwargs)


def test_an_accept_needs_nothing_and_carries_its_details():
    assert Orchestration(Outcome.ACCEPT, details={"slot": "x"}).as_reply() == {"status": "ACCEPT", "details": {"slot": "x"}}

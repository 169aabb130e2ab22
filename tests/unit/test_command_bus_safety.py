"""The command bus answers every request, whatever goes wrong: no exception escapes
`execute` (a request without a reply leaves its client waiting for a timeout). No I/O: the
handlers here fail before they would touch the store."""

from __future__ import annotations

import pytest

from runledger.commands import work_pools as wp
from runledger.commands.messages import invalid
from runledger.handlers.command_bus import CommandBus, CommandSpec
from runledger.infra.event_store import MessageTooLarge


def bus(handle, locks=lambda cmd: [("work_pool_name", "k")]) -> CommandBus:
    return CommandBus(store=None, repo=None, specs={"DeletePool": CommandSpec(wp.DeleteWorkPool, handle, lambda r: r, locks)})


async def _raises(exc: BaseException):
    async def handle(unit, cmd, ctx):
        raise exc
    return handle


@pytest.mark.parametrize("exc, code", [
    (OverflowError("date value out of range"), "unavailable"),
    (RecursionError("deep"), "unavailable"),
    (KeyError("x"), "unavailable"),
    (invalid("no", field="name"), "invalid"),
    (MessageTooLarge("the event WorkPoolUpdated", 2_000_000, 1_048_576), "invalid"),
])
async def test_any_failure_while_deciding_gets_a_reply(exc, code):
    b = bus(await _raises(exc))
    reply = await b.execute("DeletePool", b'{"name": "p"}')
    assert reply["ok"] is False and reply["error"]["code"] == code
    assert b._locks == {} and b._lock_users == {}  # the lock was released


async def test_too_large_names_the_limit_and_the_largest_field():
    b = bus(await _raises(MessageTooLarge("the event WorkPoolUpdated", 2_000_000, 1_048_576)))
    reply = await b.execute("DeletePool", b'{"name": "p"}')
    assert reply["error"]["field"] == "name"
    assert "1,048,576 bytes" in reply["error"]["message"] and "WorkPoolUpdated" in reply["error"]["message"]


async def test_a_failing_lock_key_gets_a_reply():
    def lock_key(cmd):
        raise ValueError("bad key")

    b = bus(await _raises(RuntimeError()), lock_key)
    reply = await b.execute("DeletePool", b'{"name": "p"}')
    assert reply["ok"] is False and reply["error"]["code"] == "unavailable"


@pytest.mark.parametrize("body", [b"\xff", b"[]", b'{"name": "\\u0000"}', b'{"name": "\\ud800"}', b"{" * 10_000,
                                  b'{"name": ' + b"[" * 5000 + b"]" * 5000 + b"}"])
async def test_any_body_gets_an_invalid_reply(body):
    b = bus(await _raises(RuntimeError()))
    reply = await b.execute("DeletePool", body)
    assert reply["ok"] is False and reply["error"]["code"] == "invalid"

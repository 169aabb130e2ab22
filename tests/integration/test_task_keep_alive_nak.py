"""A task worker's keep-alives (`+WPI`) and its delayed negative acknowledgements, against a
real nats-server: JetStream takes a `+WPI` that reaches it after a `-NAK` with a delay as a
fresh start of the ack wait (server/consumer.go: `processNak` sets the message's timestamp to
`now - AckWait + delay`, `progressUpdate` to `now`), so a keep-alive that lands after the nak
replaces its delay by the whole ack wait. A worker answers a message it kept alive with a
delay (a run not found yet, held back by the rules) only after every keep-alive it sent for
it, so the message comes back after its delay."""

from __future__ import annotations

import asyncio
import threading
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from runledger.commands.task_runs import TaskRun
from runledger.handlers import task_worker
from runledger.handlers.task_dispatch import task_message
from runledger.handlers.task_worker import _KeepAlive, _Pulse
from runledger.infra.nats_connection import connect
from runledger.infra.task_queues import TaskPublisher, consumer_name, task_stream_name

from .test_task_queues import running_worker

pytestmark = pytest.mark.asyncio

# Far longer than any wait below: a message that comes back within it came back after its
# nak's delay, not after the ack wait.
ACK_WAIT_SECONDS = 30.0
COME_BACK_WITHIN_SECONDS = 10.0


class _PulseCaughtSending(_Pulse):
    """The worker's keep-alive thread, beating often, caught at the worst moment: its first
    round that includes the first message it holds stops right after handing that `+WPI` to
    its connection (written to the socket only once this thread goes on), until `go` is set;
    the worker's release of that message waits for that moment. The worker then answers the
    message while its keep-alive is in flight. `go` is set once the server handles the
    worker's nak (its advisory), or once the worker hands its nak to this thread (which sends
    it after what it already has)."""

    instances: list[_PulseCaughtSending] = []

    def __init__(self, settings: Any, name: str, every: float, stuck_after: float) -> None:
        super().__init__(settings, name, every=0.05, stuck_after=stuck_after)
        self.first: str | None = None
        self.in_flight = threading.Event()
        self.go = threading.Event()
        self.came_back = threading.Event()  # a later delivery of the message is held
        self.instances.append(self)

    def hold(self, subject: str) -> None:
        if self.first is None:
            self.first = subject
        elif subject != self.first:
            self.came_back.set()
        super().hold(subject)

    def release(self, subject: str) -> None:
        if subject == self.first and not self.in_flight.is_set():
            self.in_flight.wait(30)  # blocks the worker's loop until the +WPI is on its way
        super().release(subject)

    async def _beat(self, nc: Any) -> None:
        with self._lock:
            catching = self.first in self._held and not self.in_flight.is_set()
        await super()._beat(nc)
        if catching:
            self.in_flight.set()
            self.go.wait(30)  # blocks this thread: the +WPI waits in its connection's buffer

    def nak(self, subject: str, delay: float) -> bool:
        self.go.set()
        return super().nak(subject, delay)


async def test_a_message_nakd_with_a_delay_while_a_keep_alive_is_in_flight_comes_back_after_its_delay(
        service, settings, monkeypatch):
    """A run whose start meets `not_found` (published while its create is stored) is handed back
    for 0.2 s. Its keep-alive, sent from the worker's keep-alive thread while the start was on
    its way, is still in flight when the worker answers: the run comes back in a moment, not
    after the 30 s ack wait."""
    _PulseCaughtSending.instances = []
    monkeypatch.setattr(task_worker, "_Pulse", _PulseCaughtSending)
    monkeypatch.setattr(task_worker, "NOT_FOUND_GRACE_SECONDS", 60.0)
    patient = settings.model_copy(update={"task_ack_wait_seconds": ACK_WAIT_SECONDS})

    async def never(n: int) -> int:
        raise AssertionError("a run that does not exist is never run")

    now = datetime.now(UTC)
    ghost = TaskRun(id=uuid.uuid4(), created=now, updated=now, name="ghost", task_key="ghost", dynamic_key="g",
                    parameters={"n": 1})
    nc = await connect(settings)
    try:
        async def on_nak_handled(_: Any) -> None:
            for pulse in _PulseCaughtSending.instances:
                pulse.go.set()

        await nc.subscribe(f"$JS.EVENT.ADVISORY.CONSUMER.MSG_NAKED.{task_stream_name(settings, 'scheduled')}."
                           f"{consumer_name('ghost', 'scheduled')}", cb=on_nak_handled)
        await nc.flush()
        async with running_worker(patient, {"ghost": never}) as worker:
            [pulse] = _PulseCaughtSending.instances
            assert worker._pulse is pulse
            await TaskPublisher(nc.jetstream(prefix=settings.js_api_prefix), patient).publish(
                "ghost", "scheduled", str(ghost.id), "s1", task_message(ghost))
            came_back = await asyncio.to_thread(pulse.came_back.wait, COME_BACK_WITHIN_SECONDS)
            in_flight = pulse.in_flight.is_set()
            pulse.go.set()  # let the thread go, whatever happened
    finally:
        await nc.close()
    assert in_flight  # a keep-alive was on its way when the worker answered
    assert came_back  # delivered again after the nak's delay, long before the ack wait


async def test_a_loop_keep_alive_due_as_the_message_is_nakd_with_a_delay_is_not_sent_after_it(settings):
    """Without a keep-alive thread the worker's loop keeps the message alive; a keep-alive due
    at the moment the worker answers (its timer fired, its send not yet run) is dropped, not
    sent after the nak on the same connection."""
    nc = await connect(settings)
    js = nc.jetstream(prefix=settings.js_api_prefix)
    stream, subject = f"{settings.namespace.upper()}_KEEPALIVE", f"{settings.namespace}.keepalive"
    await js.add_stream(name=stream, subjects=[subject])
    try:
        await js.add_consumer(stream, ConsumerConfig(durable_name="held", ack_policy=AckPolicy.EXPLICIT,
                                                     ack_wait=ACK_WAIT_SECONDS))
        await js.publish(subject, b"run")
        sub = await js.pull_subscribe_bind("held", stream)
        [msg] = await sub.fetch(1, timeout=5)
        keep_alive = _KeepAlive(msg, every=60.0, beats=set())
        keep_alive._beat()  # its timer fired: an in-progress acknowledgement is about to be sent
        keep_alive.cancel()
        await msg.nak(delay=0.2)
        [again] = await sub.fetch(1, timeout=COME_BACK_WITHIN_SECONDS)
        assert again.metadata.num_delivered == 2
        await again.ack()
    finally:
        await js.delete_stream(stream)
        await nc.close()

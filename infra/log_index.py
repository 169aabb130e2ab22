"""A lookup the command side keeps from the log itself: which aggregate holds an object known
by an id of its own (a work queue's id -> its pool).

The command side decides from the log alone; asking the read model (Postgres) would make a
decision depend on how far a projection has got, and the command role on the database. The
facts that make the index are events already in the log (a queue is created inside its
pool's stream of events, and never moves), so no extra event is written: the index reads
those event types by subject, once from the start and then, on a miss, from where it
stopped. A miss costs one round trip when nothing new was created; memory is one entry per
object (~150 bytes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from runledger.commands.events import EventEnvelope
from runledger.commands.messages import Event

from .event_store import EventStore


@dataclass
class LogIndex:
    """`key -> aggregate id`, from the events of `event_types` of `aggregate_type`; `keys_of`
    says which keys an event makes (a pool's creation makes its default queue)."""

    store: EventStore
    aggregate_type: str
    event_types: Sequence[str]
    keys_of: Callable[[Event], Iterable[str]]
    entries: dict[str, str] = field(default_factory=dict)
    # Per event type: the stream sequence after which nothing is read yet.
    read_up_to: dict[str, int] = field(default_factory=dict)
    _catching_up: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def lookup(self, key: str) -> str | None:
        found = self.entries.get(key)
        if found is None:
            await self.catch_up()
            found = self.entries.get(key)
        return found

    async def catch_up(self) -> None:
        """Read what the log gained since the last read, one reader at a time. (A read that
        began before this miss may have passed the event it needs: each miss reads again.)"""
        async with self._catching_up:
            for event_type in self.event_types:
                subject = f"{self.store.prefix}.{self.aggregate_type}.*.{event_type}"
                after = self.read_up_to.get(event_type, 0)
                for seq, subj, data, _ in await self.store.read_subject(subject, after + 1):
                    aggregate_id = subj.split(".")[-2]
                    for key in self.keys_of(EventEnvelope.model_validate_json(data).decode()):
                        self.entries[key] = aggregate_id
                    after = seq
                self.read_up_to[event_type] = after

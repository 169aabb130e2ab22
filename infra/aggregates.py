"""Loading aggregates: a fold of `evolve` over the aggregate's events, cached in memory with
the stream sequence of its last event (the expected sequence of the next append)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from runledger.commands.messages import Event

from .event_store import EventStore


@dataclass(frozen=True)
class AggregateKind:
    name: str
    initial: Callable[[], Any]
    evolve: Callable[[Any, Event], Any]
    # When the last event alone determines the state (name claims), load it in one round trip.
    last_event_only: bool = False


@dataclass(frozen=True)
class Loaded:
    state: Any
    seq: int  # 0: the aggregate has no events


class AggregateRepository:
    def __init__(self, store: EventStore, kinds: list[AggregateKind], max_cached: int = 200_000):
        self.store = store
        self.kinds = {k.name: k for k in kinds}
        self.max_cached = max_cached
        self._cache: OrderedDict[tuple[str, str], Loaded] = OrderedDict()

    async def load(self, aggregate_type: str, aggregate_id: str, *, refresh: bool = False) -> Loaded:
        key = (aggregate_type, aggregate_id)
        kind = self.kinds[aggregate_type]
        cached = self._cache.get(key)
        if cached is not None and not refresh:
            self._cache.move_to_end(key)
            return cached
        if kind.last_event_only:
            last = await self.store.last_event(aggregate_type, aggregate_id)
            loaded = Loaded(kind.initial(), 0) if last is None else Loaded(kind.evolve(kind.initial(), last.envelope.decode()), last.seq)
        else:
            base = cached or Loaded(kind.initial(), 0)
            state, seq = base.state, base.seq
            for stored in await self.store.read_aggregate(aggregate_type, aggregate_id, after_seq=seq):
                # An unknown event (from a newer version) raises UnknownEvent: deciding on a
                # state whose history we cannot read would be deciding blind.
                state = kind.evolve(state, stored.envelope.decode())
                seq = stored.seq
            loaded = Loaded(state, seq)
        self.remember(aggregate_type, aggregate_id, loaded)
        return loaded

    def remember(self, aggregate_type: str, aggregate_id: str, loaded: Loaded) -> None:
        key = (aggregate_type, aggregate_id)
        self._cache[key] = loaded
        self._cache.move_to_end(key)
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)

    def cached(self, aggregate_type: str, aggregate_id: str) -> Loaded | None:
        return self._cache.get((aggregate_type, aggregate_id))

    def forget(self, aggregate_type: str, aggregate_id: str) -> None:
        self._cache.pop((aggregate_type, aggregate_id), None)

    def __len__(self) -> int:
        return len(self._cache)

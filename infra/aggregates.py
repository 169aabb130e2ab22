"""Loading aggregates: a fold of `evolve` over the aggregate's events, cached in memory with
the stream sequence of its last event (the expected sequence of the next append), and
started from a snapshot when the aggregate's history is long (`infra/snapshots.py`)."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from runledger.commands.messages import Event

from .event_store import EventStore
from .snapshots import SnapshotStore

log = logging.getLogger("runledger.aggregates")


@dataclass(frozen=True)
class SnapshotCodec:
    """How an aggregate's state becomes JSON and back. Bump `version` whenever the state's
    shape changes: snapshots of another version are ignored (a full load instead)."""

    version: int
    dump: Callable[[Any], Any]
    load: Callable[[Any], Any]


@dataclass(frozen=True)
class AggregateKind:
    name: str
    initial: Callable[[], Any]
    evolve: Callable[[Any, Event], Any]
    # When the last event alone determines the state (name claims), load it in one round trip.
    last_event_only: bool = False
    # Long-lived aggregates with long histories (pools) are snapshotted.
    snapshots: SnapshotCodec | None = None
    # How many of this kind the cache keeps (None: the repository's default). Numerous,
    # short-lived aggregates (runs: ~6 KB each) are kept fewer, so a long history of them
    # cannot fill the service's memory with runs nobody will touch again.
    max_cached: int | None = None
    # For aggregates whose size grows with what they hold (a deployment's index of its
    # scheduled runs: ~0.8 KB per run): the cache keeps at most `max_weight` of `weight(state)`
    # in all, of this kind, on top of the count. None: the count alone.
    weight: Callable[[Any], int] | None = None
    max_weight: int | None = None


@dataclass(frozen=True)
class Loaded:
    state: Any
    # 0: the aggregate has no events. In the command bus's cache, a hot aggregate's state may be
    # one whose append is queued but not acknowledged yet: then `seq` is that `Pending` append.
    seq: int
    # Events folded into `state` since the aggregate's last snapshot (or since its start).
    unsnapshotted: int = 0
    # The sequence of the aggregate's last event that stays in the log, when the events after
    # it (up to `seq`) are routine ones that expire (a pool's routine polls); None: `seq`. A
    # snapshot is anchored there, never on an event that will leave the log (an anchor gone
    # looks like a log deleted and started again): a load from it folds those routine events
    # again, which changes nothing, since each says what the state says already (a queue's
    # last poll, in order).
    kept_seq: int | None = None


def kept_after(kept_seq: int | None, seq: int, event: Event) -> int | None:
    """`Loaded.kept_seq` once `event` is folded after the one at `seq` (whose own is
    `kept_seq`): unchanged by a routine event, None (the event itself) by a kept one."""
    if event.expires_no_sooner_than() is None:
        return None
    return seq if kept_seq is None else kept_seq


def anchor_of(loaded: Loaded) -> int:
    """Where a snapshot of `loaded` is anchored: its last event that stays in the log."""
    return loaded.seq if loaded.kept_seq is None else loaded.kept_seq


class AggregateRepository:
    def __init__(self, store: EventStore, kinds: list[AggregateKind], max_cached: int = 200_000,
                 snapshots: SnapshotStore | None = None, snapshot_every: int = 1000):
        self.store = store
        self.kinds = {k.name: k for k in kinds}
        self.max_cached = max_cached
        # One least-recently-used order per kind, each with its own bound.
        self._cache: dict[str, OrderedDict[str, Loaded]] = {k.name: OrderedDict() for k in kinds}
        # Per weighed kind: each cached aggregate's weight, and their sum.
        self._weights: dict[str, dict[str, int]] = {k.name: {} for k in kinds if k.weight is not None}
        self._weighed: dict[str, int] = dict.fromkeys(self._weights, 0)
        self.snapshots = snapshots if snapshot_every > 0 else None
        self.snapshot_every = snapshot_every
        self._writing: set[asyncio.Task] = set()

    async def load(self, aggregate_type: str, aggregate_id: str, *, refresh: bool = False) -> Loaded:
        kind = self.kinds[aggregate_type]
        of_kind = self._cache[aggregate_type]
        cached = of_kind.get(aggregate_id)
        if cached is not None and not refresh:
            of_kind.move_to_end(aggregate_id)
            return cached
        if kind.last_event_only:
            last = await self.store.last_event(aggregate_type, aggregate_id)
            loaded = Loaded(kind.initial(), 0) if last is None else Loaded(kind.evolve(kind.initial(), last.envelope.decode()), last.seq)
        else:
            base = cached or await self._from_snapshot(kind, aggregate_id) or Loaded(kind.initial(), 0)
            state, seq, folded, kept = base.state, base.seq, base.unsnapshotted, base.kept_seq
            for stored in await self.store.read_aggregate(aggregate_type, aggregate_id, after_seq=seq):
                # An unknown event (from a newer version) raises UnknownEvent: deciding on a
                # state whose history we cannot read would be deciding blind.
                event = stored.envelope.decode()
                state = kind.evolve(state, event)
                kept = kept_after(kept, seq, event)
                seq, folded = stored.seq, folded + 1
            loaded = Loaded(state, seq, folded, kept)
        self.remember(aggregate_type, aggregate_id, loaded)
        return loaded

    def remember(self, aggregate_type: str, aggregate_id: str, loaded: Loaded) -> None:
        kind = self.kinds[aggregate_type]
        if self._snapshot_due(kind, loaded):
            self._write_snapshot(kind, aggregate_id, loaded)
            loaded = Loaded(loaded.state, loaded.seq, 0, loaded.kept_seq)
        of_kind = self._cache[aggregate_type]
        of_kind[aggregate_id] = loaded
        of_kind.move_to_end(aggregate_id)
        if kind.weight is not None:
            weights = self._weights[aggregate_type]
            weight = kind.weight(loaded.state)
            self._weighed[aggregate_type] += weight - weights.get(aggregate_id, 0)
            weights[aggregate_id] = weight
        bound = kind.max_cached if kind.max_cached is not None else self.max_cached
        while len(of_kind) > bound or (
                kind.max_weight is not None and len(of_kind) > 1 and self._weighed[aggregate_type] > kind.max_weight):
            self._drop(aggregate_type, next(iter(of_kind)))

    def _drop(self, aggregate_type: str, aggregate_id: str) -> None:
        self._cache[aggregate_type].pop(aggregate_id, None)
        weights = self._weights.get(aggregate_type)
        if weights is not None:
            self._weighed[aggregate_type] -= weights.pop(aggregate_id, 0)

    async def _from_snapshot(self, kind: AggregateKind, aggregate_id: str) -> Loaded | None:
        if self.snapshots is None or kind.snapshots is None:
            return None
        found = await self.snapshots.get(kind.name, aggregate_id)
        if found is None:
            return None
        version, seq, encoded = found
        if version != kind.snapshots.version:
            return None
        if not await self.store.holds(seq, kind.name, aggregate_id):
            log.warning("ignoring the snapshot of %s %s: the log has no event of it at seq %d", kind.name, aggregate_id, seq)
            return None
        try:
            return Loaded(kind.snapshots.load(encoded), seq, 0)
        except Exception as e:  # a cache: a broken one costs a full load, not an error
            log.warning("ignoring an unreadable snapshot of %s %s: %s", kind.name, aggregate_id, e)
            return None

    def _snapshot_due(self, kind: AggregateKind, loaded: Loaded) -> bool:
        return (self.snapshots is not None and kind.snapshots is not None and loaded.state is not None
                and loaded.unsnapshotted >= self.snapshot_every and anchor_of(loaded) > 0)

    def _write_snapshot(self, kind: AggregateKind, aggregate_id: str, loaded: Loaded) -> None:
        """In the background: a command never waits for its aggregate's snapshot."""
        assert self.snapshots is not None and kind.snapshots is not None
        encoded = kind.snapshots.dump(loaded.state)
        task = asyncio.create_task(self.snapshots.put(kind.name, aggregate_id, kind.snapshots.version,
                                                      anchor_of(loaded), encoded))
        self._writing.add(task)
        task.add_done_callback(self._writing.discard)

    async def flush_snapshots(self) -> None:
        """Wait for the snapshots being written (tests, and a clean stop)."""
        if self._writing:
            await asyncio.gather(*self._writing, return_exceptions=True)

    def cached(self, aggregate_type: str, aggregate_id: str) -> Loaded | None:
        return self._cache[aggregate_type].get(aggregate_id)

    def forget(self, aggregate_type: str, aggregate_id: str) -> None:
        self._drop(aggregate_type, aggregate_id)

    def __len__(self) -> int:
        return sum(map(len, self._cache.values()))

"""Command handling: validate, load, decide (pure), append with optimistic concurrency, reply.

A command's handler function loads what it needs through a `Unit` (which remembers the
sequence each aggregate was loaded at) and returns the decider's `Decision`. The bus appends
the decision's events with one expected-sequence check per aggregate, reloads and decides
again on a conflict (bounded), and turns the outcome into the reply envelope.

Hot aggregates (a pool's slot counts, a deployment's limit: every claim and release touches
them) are locked while deciding (`Unit.lock`) and given back as soon as the decision is queued
for the log, not when it is stored: the next decision on them is taken against the state the
queued one leaves and chained onto it (`infra.event_store.Pending`), so successive decisions
on one aggregate share appends instead of waiting for one each.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import to_json

from runledger.commands.bounds import lone_surrogate_at
from runledger.commands.decisions import Decision, Orchestration
from runledger.commands.events import UnknownEvent, encode_event
from runledger.commands.messages import Command, DecisionContext, ErrorCode, Rejection
from runledger.infra.aggregates import AggregateRepository, Loaded, kept_after
from runledger.infra.event_store import (
    AppendUnavailable,
    EventStore,
    MessageTooLarge,
    Pending,
    WrongExpectedSequence,
)

from .endpoint import as_the_service

log = logging.getLogger("runledger.commands")


class Unit:
    """The aggregates one attempt at a command has read, with the sequences they were read at."""

    def __init__(self, repo: AggregateRepository, refresh: bool,
                 lock_more: Callable[[Iterable[AggregateKey]], Awaitable[None]] | None = None):
        self.repo = repo
        self.refresh = refresh
        # The sequence each aggregate was read at, or the append not acknowledged yet whose
        # state it was read in (`Pending`: the decision chains onto it).
        self.loaded: dict[tuple[str, str], int | Pending] = {}
        self.from_cache = False
        self._lock_more = lock_more
        self.locked_more: set[AggregateKey] = set()

    async def lock(self, keys: Iterable[AggregateKey]) -> None:
        """Lock aggregates found only by loading others (the slot counts of a run's pool):
        commands of this process that touch them then take turns instead of racing for their
        expected sequence, each deciding against the state the one before left (chained, see
        the module docstring). Call it once per attempt, with every such key, after the
        command's own locks (`CommandSpec.locks`) are held: the keys are taken in sorted order,
        and nothing waits for a command's own lock while holding one of these, so no two
        commands deadlock."""
        keys = list(keys)
        self.locked_more.update(keys)
        if self._lock_more is not None:
            await self._lock_more(keys)

    async def load(self, aggregate_type: str, aggregate_id: str, *, fresh: bool = False,
                   presumed_new: bool = False) -> Any:
        """`fresh`: read this aggregate from the log whatever the cache holds: for a state this
        instance may hold out of date where no expected-sequence check would tell, because the
        decision writes nothing to it (that a tag has no concurrency limit: see
        `task_run_commands.tag_limits_of`).

        `presumed_new`: an aggregate the cache does not hold is taken to have no events, without
        reading the log, for an id that is almost always new (one made from a fresh random key):
        the decision is checked against an empty subject when appended, and if the aggregate
        did exist, that check fails, or a refusal comes, and the command is decided again on
        the log. It saves a read of the log per such command."""
        key = (aggregate_type, aggregate_id)
        refresh = self.refresh or fresh
        in_cache = self.repo.cached(*key)
        if presumed_new and not refresh and in_cache is None:
            self.from_cache = True  # a presumption: a refusal, or no events, is checked on the log
            self.loaded[key] = 0
            return self.repo.kinds[aggregate_type].initial()
        if refresh and in_cache is not None and isinstance(in_cache.seq, Pending):
            await in_cache.seq.settled()  # the log is about to hold it, or never will
        cached = not refresh and in_cache is not None
        loaded = await self.repo.load(aggregate_type, aggregate_id, refresh=refresh)
        self.from_cache = self.from_cache or cached
        self.loaded[key] = loaded.seq
        return loaded.state


Handler = Callable[[Unit, Any, DecisionContext], Awaitable[Decision]]


@dataclass(frozen=True)
class CommandSpec:
    model: type[Command]
    handle: Handler
    to_reply: Callable[[Any], Any]
    # The aggregates (type, id) the command may touch: commands that share one run one at a
    # time in this process, so they never race each other for it. No default: a spec that
    # forgot it would otherwise serialise with every other such command, or with none.
    locks: Callable[[Any], Iterable[AggregateKey]]


class AfterAppend(Protocol):
    """What follows a decision's append (handlers/task_dispatch.TaskDispatch)."""

    def begin(self, decision: Decision) -> asyncio.Future[Any] | None:
        """Called as soon as the append is queued, before it is acknowledged: starts what may go
        out meanwhile, and is then handed to `__call__` (None: nothing started). It may go out
        for a decision whose append then fails: what it sends must be harmless then."""

    async def __call__(self, decision: Decision, begun: asyncio.Future[Any] | None) -> str | None:
        """Once the append is stored: the rest, and what `begin` started, waited for. None, or
        why it could not be done (the command's reply is then that error)."""


@dataclass(frozen=True)
class BulkSpec:
    """A command that carries many of another (`CreateTaskRuns`: many `CreateTaskRun`): each
    item is decided and appended as if sent alone, side by side, and the reply's result lists
    `item_reply` of each item's reply, in order. One request instead of one per item; the
    items' rules stay the item command's own. The whole bulk counts as one request against the
    endpoint's limits and deadline; its items go `BULK_AT_ONCE` at a time."""

    model: type[Command]
    item_command: str
    items: Callable[[Any], Sequence[Command]]
    item_reply: Callable[[dict[str, Any]], dict[str, Any]]


AggregateKey = tuple[str, str]
# A bulk command's items decided at once, at most (`CommandBus._execute_bulk`).
BULK_AT_ONCE = 64


def ok(result: Any, seq: int | None, created: bool | None = None,
       orchestration: Orchestration | None = None) -> dict[str, Any]:
    reply = {"ok": True, "result": result, "seq": seq, "created": created}
    if orchestration is not None:
        reply["orchestration"] = orchestration.as_reply()
    return reply


def error(code: ErrorCode | str, message: str, **extra: Any) -> dict[str, Any]:
    body = {"code": str(code), "message": message}
    body.update({k: v for k, v in extra.items() if v is not None})
    return {"ok": False, "error": body}


def _string_length(err: Any) -> tuple[str, str] | None:
    """A length error on a string, said in characters. A bound on text whose other checks run
    first (`StoredText`) is applied to whatever they return, and pydantic then counts "items"."""
    kind = {"too_long": "most", "too_short": "least"}.get(err["type"])
    if kind is None or not isinstance(err.get("input"), str):
        return None
    bound = (err.get("ctx") or {}).get("max_length" if kind == "most" else "min_length")
    if not isinstance(bound, int):
        return None
    return f"String should have at {kind} {bound} character{'' if bound == 1 else 's'}", f"string_{err['type']}"


def validation_error_reply(e: ValidationError) -> dict[str, Any]:
    details = []
    for err in e.errors(include_url=False):
        reason, kind = _string_length(err) or (err["msg"], err["type"])
        details.append({"field": ".".join(str(p) for p in err["loc"]) or None, "reason": reason, "type": kind})
    first = details[0]
    where = first["field"] or "body"
    return error(ErrorCode.INVALID, f"{where}: {first['reason']}", field=first["field"], details=details)


M = TypeVar("M", bound=BaseModel)


def parse_payload(model: type[M], raw: bytes) -> M | dict[str, Any]:
    """The model, or an `invalid` reply naming the field and the reason.

    Strict: "1" is not an int and "yes" is not a bool; JSON strings still make UUIDs and
    datetimes. An empty body is an empty object. Whatever the body, the answer is the model
    or a reply: a validator that fails other than with a ValueError (a bug, since the input
    caused it) still ends as `invalid`."""
    try:
        return model.model_validate_json(raw or b"{}", strict=True)
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)
        if errors and errors[0]["type"] in ("json_invalid", "model_type") and not errors[0]["loc"]:
            if errors[0]["type"] == "json_invalid" and ("surrogate" in errors[0]["msg"] or "hex escape" in errors[0]["msg"]):
                found = _lone_surrogate(raw)
                if found is not None:
                    return found
            what = "valid JSON" if errors[0]["type"] == "json_invalid" else "a JSON object"
            return error(ErrorCode.INVALID, f"body is not {what}: {errors[0]['msg']}")
        return validation_error_reply(e)
    except Exception as e:  # e.g. OverflowError or RecursionError inside a validator
        log.exception("validating a %s body failed unexpectedly", model.__name__)
        return error(ErrorCode.INVALID, f"body could not be validated: {type(e).__name__}: {e}")


def _lone_surrogate(raw: bytes) -> dict[str, Any] | None:
    """The `invalid` reply naming the field that holds a lone surrogate escape (`"\\ud800"`),
    which JSON's parser refuses as malformed: Python's `json` reads it, so the reply can say
    what is wrong and where, as for any other text the read models cannot store. None: the
    body is malformed otherwise."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    found = lone_surrogate_at(body) if isinstance(body, dict) else None
    if found is None:
        return None
    where, problem = found
    return error(ErrorCode.INVALID, f"{where}: {problem}", field=where)


def largest_field(cmd: BaseModel) -> str | None:
    """The field of a command that takes the most room as JSON: what to name when its events
    are too large."""
    sizes = {name: len(to_json(getattr(cmd, name), fallback=str)) for name in cmd.model_fields_set}
    return max(sizes, key=sizes.__getitem__) if sizes else None


@dataclass
class CommandBus:
    store: EventStore
    repo: AggregateRepository
    specs: dict[str, CommandSpec | BulkSpec]
    retries: int = 10
    clock: Callable[[], DecisionContext] = DecisionContext
    # What is published around a decision's append (the task runs it queues, the task runs it
    # finishes): handlers/task_dispatch.TaskDispatch.
    after_append: AfterAppend | None = None
    _locks: dict[AggregateKey, asyncio.Lock] = field(default_factory=dict)
    _lock_users: dict[AggregateKey, int] = field(default_factory=dict)

    async def execute(self, name: str, raw: bytes) -> dict[str, Any]:
        """Always a reply, whatever the body: nothing raises out of here but a cancel."""
        spec = self.specs.get(name)
        if spec is None:
            return error(ErrorCode.INVALID, f"unknown command {name!r}")
        parsed = parse_payload(spec.model, raw)
        if isinstance(parsed, dict):
            return parsed
        if isinstance(spec, BulkSpec):
            return await self._execute_bulk(spec, parsed)
        return await self._execute_locked(name, spec, parsed)

    async def _execute_bulk(self, bulk: BulkSpec, cmd: Command) -> dict[str, Any]:
        """Each item through `_execute_locked`, at most `BULK_AT_ONCE` at a time (as many
        concurrent commands as a busy service takes from its endpoint), each with its own
        locks; the reply's `seq` is the highest of the items' (read-your-writes for all)."""
        spec = self.specs[bulk.item_command]
        assert isinstance(spec, CommandSpec), "a bulk command carries commands decided alone"
        room = asyncio.Semaphore(BULK_AT_ONCE)

        async def one(item: Command) -> dict[str, Any]:
            async with room:
                return await self._execute_locked(bulk.item_command, spec, item)

        replies = await asyncio.gather(*(one(item) for item in bulk.items(cmd)))
        seq = max((r["seq"] for r in replies if r.get("ok") and r.get("seq") is not None), default=None)
        return ok([bulk.item_reply(r) for r in replies], seq)

    async def _execute_locked(self, name: str, spec: CommandSpec, cmd: Command) -> dict[str, Any]:
        keys: list[AggregateKey] = []
        # Locks taken while deciding (`Unit.lock`), held now: given back as soon as the
        # decision is queued for the log, so the next decision on them can chain onto it.
        more_held: dict[AggregateKey, asyncio.Lock] = {}

        def release_more() -> None:
            for lock in more_held.values():
                lock.release()
            more_held.clear()

        try:
            # Always in one order, so two commands that lock the same set never deadlock.
            wanted = sorted(set(spec.locks(cmd)))
            locks = [self._acquire_lock(key) for key in wanted]  # counted now, released below
            keys = list(wanted)
            async with contextlib.AsyncExitStack() as held:
                for lock in locks:
                    await held.enter_async_context(lock)

                async def lock_more(more: Iterable[AggregateKey]) -> None:
                    for key in sorted(set(more) - set(wanted) - set(more_held)):
                        if key not in keys:
                            keys.append(key)
                            lock = self._acquire_lock(key)
                        else:
                            lock = self._locks[key]
                        await lock.acquire()
                        more_held[key] = lock

                return await self._execute(name, spec, cmd, lock_more, release_more)
        except Rejection as r:
            return {"ok": False, "error": r.as_reply()}
        except MessageTooLarge as e:
            return error(ErrorCode.INVALID, f"{name} is too large to record: {e}", field=largest_field(cmd))
        except UnknownEvent as e:
            return error(ErrorCode.UNAVAILABLE, f"the event log holds an event this version cannot read: {e}")
        except AppendUnavailable as e:
            return error(ErrorCode.UNAVAILABLE, str(e))
        except Exception:  # a bug or an outage must still get an answer, never a timeout
            log.exception("command %s failed", name)
            return error(ErrorCode.UNAVAILABLE, f"command {name} failed on the server; see the service log")
        finally:
            release_more()
            for key in keys:
                self._release_lock(key)

    def _acquire_lock(self, key: AggregateKey) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        self._lock_users[key] = self._lock_users.get(key, 0) + 1
        return lock

    def _release_lock(self, key: AggregateKey) -> None:
        users = self._lock_users[key] - 1
        if users:
            self._lock_users[key] = users
        else:
            del self._lock_users[key]
            del self._locks[key]

    async def execute_unlocked(self, name: str, cmd: Command) -> dict[str, Any]:
        """A command decided while the caller already holds the locks of what it touches (a
        correction written by the same command: a task run that could not be queued). The
        service's own: not held to the limits of whoever sent the command it corrects."""
        with as_the_service():
            spec = self.specs[name]
            assert isinstance(spec, CommandSpec)
            return await self._execute(name, spec, cmd)

    async def _execute(self, name: str, spec: CommandSpec, cmd: Command,
                       lock_more: Callable[[Iterable[AggregateKey]], Awaitable[None]] | None = None,
                       release_more: Callable[[], None] = lambda: None) -> dict[str, Any]:
        fingerprint = None
        if cmd.bus_key is not None:
            fingerprint = hashlib.sha256(name.encode() + b"\0" + cmd.model_dump_json(exclude={cmd.BUS_KEY_FIELD or ""}).encode()).hexdigest()
            earlier = await self.store.read_idempotency_record(cmd.bus_key)
            if earlier is not None:
                return self._repeat_reply(earlier, fingerprint)
        refresh = False
        for _attempt in range(self.retries + 1):
            unit = Unit(self.repo, refresh, lock_more)
            ctx = self.clock()
            try:
                decision = await spec.handle(unit, cmd, ctx)
            except Rejection:
                if unit.from_cache:
                    # Another instance may have changed what our cache holds: look once more.
                    refresh = True
                    continue
                raise
            if not decision.events:
                if unit.from_cache:
                    refresh = True
                    continue
                seq = max((s for s in unit.loaded.values() if isinstance(s, int)), default=None)
                return ok(spec.to_reply(decision.result), seq, decision.created, decision.orchestration)
            envelopes = [
                encode_event(e.aggregate_id, e.event, occurred=ctx.now, event_id=ctx.new_id(), idempotency_key=cmd.bus_key)
                for e in decision.events
            ]
            reply_result = spec.to_reply(decision.result)
            idem = None
            if cmd.bus_key is not None:
                record = {"command": name, "fingerprint": fingerprint, "result": reply_result,
                          "created": decision.created, "events": len(envelopes)}
                if decision.orchestration is not None:
                    record["orchestration"] = decision.orchestration.as_reply()
                idem = (cmd.bus_key, json.dumps(record, default=str).encode())
            expected = {k: unit.loaded.get(k, 0) for k in {(e.aggregate_type, e.aggregate_id) for e in envelopes}}
            messages = self.store.build_messages(envelopes, expected, idem)
            queued = self.store.submit(messages)
            begun = self.after_append.begin(decision) if self.after_append is not None else None
            mine = self._remember_chainable(decision, unit, queued, offset=1 if idem is not None else 0)
            release_more()
            try:
                last_seq = await queued.result
            except WrongExpectedSequence:
                self._forget_chained(decision)
                if idem is not None:
                    earlier = await self.store.read_idempotency_record(idem[0])  # the command's key
                    if earlier is not None:
                        return self._repeat_reply(earlier, fingerprint)
                refresh = True
                # Another instance won this round: back off a little, with jitter, so that
                # instances contending for one aggregate take turns instead of colliding again.
                await asyncio.sleep(random.uniform(0, min(0.05, 0.002 * 2**_attempt)))
                continue
            except BaseException:
                self._forget_chained(decision)
                raise
            self._remember(decision, unit, last_seq, mine)
            if self.after_append is not None:
                problem = await self.after_append(decision, begun)
                if problem is not None:
                    refused = error(ErrorCode.UNAVAILABLE, problem)
                    if idem is not None:
                        await self._record_refusal(idem[0], name, fingerprint, refused)
                    return refused
            return ok(reply_result, last_seq, decision.created, decision.orchestration)
        return error(ErrorCode.CONFLICT, f"{name} lost {self.retries + 1} races in a row for the same object; try again")

    def _remember_chainable(self, decision: Decision, unit: Unit, queued: Any, offset: int) -> dict[tuple[str, str], Pending]:
        """Before the append is acknowledged, cache the state it leaves for the aggregates the
        command locked while deciding (`Unit.lock`: hot ones, such as a pool's slot counts), so
        that the next decision on them, let in as soon as this one is queued, decides against
        it and chains onto it instead of waiting for the log (see `Pending`)."""
        mine: dict[tuple[str, str], Pending] = {}
        if not unit.locked_more:
            return mine
        by_agg: dict[tuple[str, str], list[tuple[int, Any]]] = {}
        for i, new in enumerate(decision.events):
            by_agg.setdefault((new.aggregate_type, new.aggregate_id), []).append((offset + i, new.event))
        for key, items in by_agg.items():
            if key not in unit.locked_more:
                continue
            kind = self.repo.kinds[key[0]]
            assert kind.snapshots is None, "a chained aggregate is not snapshotted"
            cached = self.repo.cached(*key)
            loaded_at = unit.loaded.get(key, 0)
            # What we decided against: the cache as we read it, or as the append we chained onto
            # left it once it landed (its acknowledgement replaces its pending entry meanwhile).
            landed = isinstance(loaded_at, Pending) and cached is not None and loaded_at.landed_seq() == cached.seq
            if cached is not None and (cached.seq is loaded_at or cached.seq == loaded_at or landed):
                state = cached.state
            elif loaded_at == 0:
                state = kind.initial()
            else:
                continue  # the cache moved on meanwhile: no chaining onto this one
            if key[1] in decision.after:
                state = decision.after[key[1]]
            else:
                for _, event in items:
                    state = kind.evolve(state, event)
            pending = Pending(queued, items[-1][0])
            self.repo.remember(*key, Loaded(state, pending))  # type: ignore[arg-type]
            mine[key] = pending
        return mine

    def _forget_chained(self, decision: Decision) -> None:
        """An append failed: the states chained onto it never were; the next decision reads
        the log."""
        for new in decision.events:
            cached = self.repo.cached(new.aggregate_type, new.aggregate_id)
            if cached is not None and isinstance(cached.seq, Pending):
                self.repo.forget(new.aggregate_type, new.aggregate_id)

    def _remember(self, decision: Decision, unit: Unit, last_seq: int,
                  chained: dict[tuple[str, str], Pending] | None = None) -> None:
        """Fold our own events into the cache so the next command needs no read. The events of
        one append are stored contiguously, so each one's sequence follows from the last.
        `chained`: aggregates cached before the acknowledgement (`_remember_chainable`)."""
        n = len(decision.events)
        by_agg: dict[tuple[str, str], list[tuple[int, Any]]] = {}
        for i, new in enumerate(decision.events):
            by_agg.setdefault((new.aggregate_type, new.aggregate_id), []).append((last_seq - (n - 1 - i), new.event))
        for (atype, aid), items in by_agg.items():
            kind = self.repo.kinds[atype]
            cached = self.repo.cached(atype, aid)
            ours = (chained or {}).get((atype, aid))
            if ours is not None:
                if cached is not None and cached.seq is ours:  # nobody chained on since: now it is stored
                    # (a chained aggregate is never snapshotted: its anchor is not followed)
                    self.repo.remember(atype, aid, Loaded(cached.state, items[-1][0], cached.unsnapshotted))
                continue
            loaded_at = unit.loaded.get((atype, aid), 0)
            if cached is not None and cached.seq == loaded_at:
                state, folded = cached.state, cached.unsnapshotted
            elif loaded_at == 0:
                state, folded = kind.initial(), 0
            else:
                self.repo.forget(atype, aid)
                continue
            if aid in decision.after:
                state = decision.after[aid]  # the decider folded these events already
            else:
                for _, event in items:
                    state = kind.evolve(state, event)
            kept, before = (cached.kept_seq, loaded_at) if cached is not None and cached.seq == loaded_at else (None, 0)
            for at, event in items:
                kept, before = kept_after(kept, before, event), at
            self.repo.remember(atype, aid, Loaded(state, items[-1][0], folded + len(items), kept))

    async def _record_refusal(self, bus_key: str, name: str, fingerprint: str | None, refused: dict[str, Any]) -> None:
        """The decision was stored, but what had to follow it could not be done and was undone
        (a task run whose key was full, cancelled): its idempotency record, written with its
        events, says it succeeded. A later record under the same key, with the error, is the
        one a resent command finds, so a client retrying after a lost reply is told the same."""
        record = {"command": name, "fingerprint": fingerprint, "error": refused["error"], "events": 0}
        try:
            await self.store.replace_idempotency_record(bus_key, json.dumps(record).encode())
        except Exception:
            log.warning("command %s: the refusal could not be recorded under its idempotency key; a resent "
                        "command would be told it succeeded", name, exc_info=True)

    @staticmethod
    def _repeat_reply(earlier: tuple[int, dict], fingerprint: str | None) -> dict[str, Any]:
        seq, record = earlier
        if fingerprint is not None and record.get("fingerprint") != fingerprint:
            return error(ErrorCode.CONFLICT, "this idempotency key was already used for a different command")
        if "error" in record:
            return {"ok": False, "error": record["error"], "repeat": True}
        reply = ok(record.get("result"), seq + int(record.get("events", 0)), record.get("created"))
        if "orchestration" in record:
            reply["orchestration"] = record["orchestration"]
        reply["repeat"] = True  # the first reply, again: nothing was appended this time
        return reply

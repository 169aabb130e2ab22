"""Leases: at most one active holder of a single-active role across every process on the
same servers.

Why: a projection (and later the scheduler, the clock and the dispatchers) must run in one
process at a time. Two projection runners on one namespace re-create each other's durable
consumer and race for the checkpoint; two schedulers would schedule every run twice. So each
such role runs only while it holds a lease, and every other process waits as a standby.

How: one key per role (`projection.<name>`, `scheduler`, ...) in the JetStream key-value
bucket `settings.lease_bucket` (`<NS>_LEASES`). The lease is taken with KV `create` (the
server refuses it while the key holds a value) and written with a per-message TTL, so a
holder that dies without a word (SIGKILL, a lost machine) loses it when the TTL runs out.
The holder renews it well before then with an update that expects its own last revision;
a renewal that fails for any reason (another holder, a timeout, a closed connection) means
the lease is lost and the work stops at once, before the TTL could have let anyone else in.
A stopping holder deletes the key (only its own revision), so a standby takes over within
one poll interval instead of a TTL.

A lease is not a fence by itself: a holder paused longer than the TTL (a stopped VM) can
still finish a write it began. Writers that must never overlap add their own guard (the
projection checkpoint only moves forward, see projections/runner.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import Header, KeyValueConfig, StorageType
from nats.js.errors import APIError, BucketNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from .nats_connection import BrokerUnavailable
from .settings import Settings

log = logging.getLogger("runledger.leases")

T = TypeVar("T")

# The bucket's own max_age only sweeps what no TTL covers (delete markers); each lease
# expires by its own per-message TTL, which may not exceed it.
BUCKET_MAX_AGE_SECONDS = 300.0
DEFAULT_TTL_SECONDS = 5


def lease_bucket_config(settings: Settings) -> KeyValueConfig:
    return KeyValueConfig(bucket=settings.lease_bucket, history=1, ttl=BUCKET_MAX_AGE_SECONDS,
                          storage=StorageType.FILE, description="runledger leases of the single-active roles",
                          replicas=settings.stream_replicas)


async def ensure_lease_bucket(js: JetStreamContext, settings: Settings, *, change: bool = True) -> list[str]:
    """Creates the lease bucket if missing (nats-py creates KV buckets with per-message TTLs
    allowed), or allows the TTLs on one made without them; returns what it did (`change`
    False: what it would do)."""
    bucket = settings.lease_bucket
    try:
        await js.key_value(bucket)
    except BucketNotFoundError:
        if not change:
            return [f"bucket {bucket} missing"]
        await js.create_key_value(lease_bucket_config(settings))
        return [f"created bucket {bucket}"]
    # Made by someone else without per-message TTLs (a lease could then never be written):
    # allow them (a stream can gain the setting, never lose it).
    info = await js.stream_info(f"KV_{bucket}")
    if info.config.allow_msg_ttl:
        return []
    if not change:
        return [f"bucket {bucket} outdated: allow_msg_ttl"]
    await js.update_stream(dataclasses.replace(info.config, allow_msg_ttl=True))
    return [f"upgraded bucket {bucket}: allow_msg_ttl"]


def default_owner() -> str:
    """Who holds a lease, as other processes see it: host, pid and a random tag (two leases
    in one process are two owners)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


_BROKER_ERRORS = (nats.errors.Error, TimeoutError, OSError)


def stop_if_cancelled() -> None:
    """Raise CancelledError when someone has asked this task to stop.

    On Python 3.11, `asyncio.wait_for` (inside every nats-py request) swallows a cancel that
    lands just as its reply arrives; the task still counts the request (`cancelling()`). A
    loop that retries and sleeps would then carry on for ever and its `stop()` would hang:
    seen as a hung test, about 1 run in 4, when a lease holder was cancelled while it polled.
    Loops that run until cancelled call this at every turn."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class Lease:
    """One role's lease in the lease bucket; see the module docstring for why.

    `run(work)` is the usual way in: it waits as a standby until the lease is free, runs
    `work()` while renewing the lease, cancels it at once when a renewal fails (and waits
    again), and gives the lease up when it is cancelled or `work` ends. `acquire`, `renew`
    and `release` are the steps, for callers that drive them themselves."""

    def __init__(self, js: JetStreamContext, kv: KeyValue, bucket: str, key: str, *, ttl: int = DEFAULT_TTL_SECONDS,
                 owner: str | None = None, label: str | None = None):
        if not 1 <= ttl <= BUCKET_MAX_AGE_SECONDS:
            raise ValueError(f"a lease TTL must be between 1 and {BUCKET_MAX_AGE_SECONDS:g} s")
        self.kv, self.js, self.key, self.ttl = kv, js, key, int(ttl)
        self.owner = owner or default_owner()
        self.label = label or key
        self.revision: int | None = None
        self.holder: str | None = None  # who holds it when we do not (as last seen)
        # Renew three times per TTL; each renewal must answer within a third of it, so a
        # failed one is noticed while the last good one still covers us.
        self.renew_interval = self.ttl / 3
        self.poll_interval = min(1.0, self.ttl / 4)
        self._subject = f"$KV.{bucket}.{key}"

    @classmethod
    async def open(cls, js: JetStreamContext, settings: Settings, key: str, **kwargs) -> Lease:
        """A lease on `key` in this namespace's lease bucket. On a broker without users the
        bucket is made if missing, as the service sets such a broker up itself; with
        credentials it must be there (`runledger broker-setup`): the service's role may not
        create a stream, and the request would only time out."""
        if not settings.logs_in:
            await ensure_lease_bucket(js, settings)
        try:
            kv = await js.key_value(settings.lease_bucket)
        except BucketNotFoundError:
            raise BrokerUnavailable(
                f"the lease bucket {settings.lease_bucket} is missing: run `runledger broker-setup` with the admin "
                "role's credentials, then start again.") from None
        return cls(js, kv, settings.lease_bucket, key, **kwargs)

    @property
    def held(self) -> bool:
        return self.revision is not None

    async def acquire(self) -> bool:
        """Take the lease if nobody holds it. False when another owner does."""
        try:
            async with asyncio.timeout(self.renew_interval):
                self.revision = await self.kv.create(self.key, self.owner.encode(), msg_ttl=self.ttl)
            self.holder = self.owner
            return True
        except KeyWrongLastSequenceError:
            pass
        except NotFoundError:
            # nats-py's `create`, refused because the key exists, reads it to see whether it
            # was deleted; when its TTL ran out in between, that read finds nothing and raises
            # this. The key is free now: taken at the next poll.
            return False
        try:
            entry = await self.kv.get(self.key)
        except NotFoundError:  # expired or released since: try again at the next poll
            return False
        value = (entry.value or b"").decode(errors="replace")
        if value == self.owner and entry.revision is not None:
            # Ours already (a renewal or create whose reply was lost): carry on with it.
            self.revision = entry.revision
            return await self.renew()
        self.holder = value
        return False

    async def renew(self) -> bool:
        """Extend the lease by another TTL; False (and no longer held) when that fails."""
        if self.revision is None:
            return False
        try:
            async with asyncio.timeout(self.renew_interval):
                ack = await self.js.publish(self._subject, self.owner.encode(), msg_ttl=self.ttl,
                                            headers={Header.EXPECTED_LAST_SUBJECT_SEQUENCE: str(self.revision)})
            self.revision = ack.seq
            return True
        except (APIError, *_BROKER_ERRORS) as e:
            log.warning("%s: renewing the lease %s failed: %s", self.label, self.key, _describe(e))
            self.revision = None
            return False

    async def release(self) -> None:
        """Give the lease up (only our own revision of it), so a standby need not wait out
        the TTL. Best effort: if this fails, the TTL frees it."""
        revision, self.revision = self.revision, None
        if revision is None:
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await self.kv.delete(self.key, last=revision)

    async def run(self, work: Callable[[], Awaitable[T]]) -> T:
        """Standby until the lease is ours, then `work()` while it stays ours. Returns what
        `work` returns (or raises what it raises) once it ends by itself."""
        standby_said = broker_said = False
        try:
            while True:
                stop_if_cancelled()
                try:
                    got = await self.acquire()
                    broker_said = False
                except _BROKER_ERRORS as e:
                    if not broker_said:
                        log.warning("%s: cannot reach the lease bucket (%s); trying again", self.label, _describe(e))
                        broker_said = True
                    got = False
                if not got:
                    if not standby_said and not broker_said:
                        log.info("%s: standby: another process holds the lease %s (%s)", self.label, self.key, self.holder)
                        standby_said = True
                    stop_if_cancelled()
                    await asyncio.sleep(self.poll_interval)
                    continue
                standby_said = False
                log.info("%s: holding the lease %s", self.label, self.key)
                worker = asyncio.ensure_future(work())
                try:
                    while True:
                        await asyncio.wait({worker}, timeout=self.renew_interval)
                        if worker.done():
                            return worker.result()
                        renewed = await self.renew()
                        stop_if_cancelled()
                        if not renewed:
                            break
                finally:
                    if not worker.done():
                        worker.cancel()
                        with contextlib.suppress(asyncio.CancelledError, Exception):
                            await worker
                log.warning("%s: lost the lease %s; stopped, waiting as a standby", self.label, self.key)
        finally:
            await self.release()


def _describe(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def holder_lookup(js: JetStreamContext, settings: Settings) -> Callable[[str], Awaitable[str | None]]:
    """`await holder(key)`: who holds the lease on `key` now (None: nobody), for health
    reports. Never raises: an unreachable bucket reads as "unknown"."""
    bucket: dict[str, KeyValue] = {}

    async def holder(key: str) -> str | None:
        try:
            async with asyncio.timeout(2):
                if "kv" not in bucket:
                    bucket["kv"] = await js.key_value(settings.lease_bucket)
                entry = await bucket["kv"].get(key)
        except NotFoundError:  # no bucket yet, no key, or a released one
            return None
        except (APIError, *_BROKER_ERRORS):
            return "unknown"
        return (entry.value or b"").decode(errors="replace") or None

    return holder

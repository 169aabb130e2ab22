"""Snapshots of aggregate state, so that loading an aggregate with a long history after a
restart reads the last snapshot and the events after it, not the whole history.

A snapshot is a cache, never the truth: one per aggregate in a JetStream key-value bucket
(`<NS>_SNAPSHOTS`, history 1), holding the state's codec version, the stream sequence it
reflects and the state. A missing, unreadable or old-version snapshot means a full load from
the log, which is always correct. The log itself is never shortened."""

from __future__ import annotations

import json
import logging
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue

from .settings import Settings

log = logging.getLogger("runledger.snapshots")


def snapshot_bucket_config(settings: Settings) -> KeyValueConfig:
    return KeyValueConfig(bucket=settings.snapshot_bucket, history=1, storage=StorageType.FILE,
                          description="runledger aggregate snapshots: a cache of the event log",
                          replicas=settings.stream_replicas)


async def ensure_snapshot_bucket(js: JetStreamContext, settings: Settings, *, change: bool = True) -> list[str]:
    """Creates the bucket if missing; returns what it did (`change` False: what it would do).
    A store whose bucket went missing since reads and writes nothing (a cache) rather than
    making it: setup belongs to the admin role (infra/jetstream_setup.py `ensure_broker`)."""
    try:
        await js.key_value(settings.snapshot_bucket)
        return []
    except BucketNotFoundError:
        if not change:
            return [f"bucket {settings.snapshot_bucket} missing"]
    await js.create_key_value(snapshot_bucket_config(settings))
    return [f"created bucket {settings.snapshot_bucket}"]


class SnapshotStore:
    def __init__(self, js: JetStreamContext, settings: Settings):
        self.js = js
        self.settings = settings
        self._kv: KeyValue | None = None

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.js.key_value(self.settings.snapshot_bucket)
        return self._kv

    @staticmethod
    def key(aggregate_type: str, aggregate_id: str) -> str:
        return f"{aggregate_type}.{aggregate_id}"

    async def get(self, aggregate_type: str, aggregate_id: str) -> tuple[int, int, Any] | None:
        """(codec version, stream sequence, encoded state) or None; never raises."""
        try:
            entry = await (await self._bucket()).get(self.key(aggregate_type, aggregate_id))
            assert entry.value is not None, "an empty entry"  # like any broken one: warned, ignored
            body = json.loads(entry.value)
            return int(body["v"]), int(body["seq"]), body["state"]
        except KeyNotFoundError:
            return None
        except Exception as e:  # a cache: a broken one costs a full load, not an error
            log.warning("ignoring the snapshot of %s %s: %s: %s", aggregate_type, aggregate_id, type(e).__name__, e)
            return None

    async def put(self, aggregate_type: str, aggregate_id: str, version: int, seq: int, state: Any) -> None:
        try:
            body = json.dumps({"v": version, "seq": seq, "state": state}).encode()
            await (await self._bucket()).put(self.key(aggregate_type, aggregate_id), body)
        except Exception as e:
            log.warning("could not write the snapshot of %s %s at seq %d: %s: %s",
                        aggregate_type, aggregate_id, seq, type(e).__name__, e)

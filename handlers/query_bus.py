"""Query answering from the Postgres read models, with bounded read-your-writes waits."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from runledger.commands.messages import ErrorCode, Rejection
from runledger.projections.tables import projection_checkpoints

from .command_bus import error, ok, parse_payload

log = logging.getLogger("runledger.queries")

QueryFn = Callable[[AsyncConnection, Any], Awaitable[Any]]


@dataclass
class CheckpointWatch:
    """How far the read models have got. A projection runner in this process reports each
    commit through `applied`; otherwise the checkpoints table is polled."""

    engine: AsyncEngine
    projections: Sequence[str]
    local: bool = False
    _positions: dict[str, int] = field(default_factory=dict)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def applied(self, projection: str, seq: int) -> None:
        self._positions[projection] = seq
        self._changed.set()

    async def position(self) -> int:
        if self.local and len(self._positions) == len(self.projections):
            return min(self._positions.values())
        async with self.engine.connect() as conn:
            stmt = select(func.min(projection_checkpoints.c.last_seq), func.count()).where(
                projection_checkpoints.c.name.in_(list(self.projections))
            )
            low, count = (await conn.execute(stmt)).one()
        return (low or 0) if count == len(self.projections) else 0

    async def wait_for(self, seq: int, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if await self.position() >= seq:
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._changed.clear()
            try:  # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel
                async with asyncio.timeout(min(remaining, 0.005 if not self.local else remaining)):
                    await self._changed.wait()
            except TimeoutError:
                pass


@dataclass
class QueryBus:
    engine: AsyncEngine
    specs: dict[str, tuple[type[BaseModel], QueryFn]]
    watch: CheckpointWatch
    wait_timeout: float = 5.0

    async def execute(self, name: str, raw: bytes) -> dict[str, Any]:
        spec = self.specs.get(name)
        if spec is None:
            return error(ErrorCode.INVALID, f"unknown query {name!r}")
        model, fn = spec
        parsed = parse_payload(model, raw)
        if isinstance(parsed, dict):
            return parsed
        try:
            min_seq = getattr(parsed, "min_seq", None)
            if min_seq and not await self.watch.wait_for(min_seq, self.wait_timeout):
                return error(ErrorCode.UNAVAILABLE, f"the read model did not reach stream sequence {min_seq} within {self.wait_timeout:g} s")
            async with self.engine.connect() as conn:
                result = await fn(conn, parsed)
            seq = await self.watch.position() if self.watch.local else None
            return ok(result, seq)
        except Rejection as r:
            return {"ok": False, "error": r.as_reply()}
        except Exception:
            log.exception("query %s failed", name)
            return error(ErrorCode.UNAVAILABLE, f"query {name} failed on the server; see the service log")

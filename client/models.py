"""What the client returns: the work pool, work queue and flow reply shapes of the broker
contract (`work_pool_reply` / `work_queue_reply` in `runledger.commands.work_pools`,
`Flow.reply` in `runledger.commands.flows`).

Unknown fields are kept (`extra="allow"`) so an older client still reads a newer service.
Datetimes dump back as the service wrote them, so `model_dump(mode="json")` reproduces the
service's JSON (the CLI's `--json` relies on it): a pool's and a queue's with `isoformat()`
(`+00:00`), a flow's with pydantic's own format (`Z`), since the service dumps the `Flow`
model itself."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, PlainSerializer

IsoDatetime = Annotated[datetime, PlainSerializer(lambda d: d.isoformat(), return_type=str, when_used="json")]


class WorkPool(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    id: uuid.UUID
    created: IsoDatetime
    updated: IsoDatetime
    name: str
    description: str | None = None
    type: str
    base_job_template: dict[str, Any] = {}
    is_paused: bool = False
    concurrency_limit: int | None = None
    status: str | None = None  # READY | NOT_READY | PAUSED; None for `prefect-agent` pools
    default_queue_id: uuid.UUID
    storage_configuration: dict[str, Any] = {}
    active_slots: int | None = None  # only with a concurrency limit


class WorkQueue(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    id: uuid.UUID
    created: IsoDatetime
    updated: IsoDatetime
    name: str
    description: str | None = ""
    is_paused: bool = False
    concurrency_limit: int | None = None
    priority: int
    work_pool_id: uuid.UUID
    work_pool_name: str
    last_polled: IsoDatetime | None = None
    status: str | None = None  # READY | NOT_READY | PAUSED
    filter: Any = None  # deprecated, always null
    active_slots: int | None = None  # only with a concurrency limit


class Flow(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    id: uuid.UUID
    created: datetime  # not IsoDatetime: the service's `Flow.reply()` writes UTC as `Z`
    updated: datetime
    name: str
    tags: list[str] = []
    labels: dict[str, Any] = {}

"""Query request schemas: what a client may ask the read side (BEHAVIOUR C-2, WP-7, WQ-7, WQ-10).

They live beside the commands because clients and the service share them; the answers come
from the Postgres read models in `projections/`.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from .work_pools import PoolName, QueueName

DEFAULT_LIMIT = 200


class Query(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Read-your-writes: wait (bounded) until the read model has applied this stream sequence.
    min_seq: Annotated[int, Field(ge=0)] | None = None


class Page(Query):
    limit: Annotated[int, Field(ge=0, le=DEFAULT_LIMIT)] = DEFAULT_LIMIT
    offset: Annotated[int, Field(ge=0)] = 0


T = TypeVar("T")


class AnyOf(BaseModel, Generic[T]):
    model_config = ConfigDict(extra="forbid", frozen=True)

    any_: list[T] | None = None


class WorkPoolFilter(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: AnyOf[uuid.UUID] | None = None
    name: AnyOf[str] | None = None
    type: AnyOf[str] | None = None


class WorkQueueFilter(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: AnyOf[uuid.UUID] | None = None
    name: AnyOf[str] | None = None


class GetWorkPool(Query):
    name: PoolName


class ListWorkPools(Page):
    """Ordered by name ascending."""

    work_pools: WorkPoolFilter | None = None


class CountWorkPools(Query):
    work_pools: WorkPoolFilter | None = None


class GetWorkQueue(Query):
    work_pool_name: PoolName
    work_queue_name: QueueName


class ListWorkQueues(Page):
    """The queues of one pool, ordered by priority ascending (PR-5)."""

    work_pool_name: PoolName
    work_queues: WorkQueueFilter | None = None


class CountWorkQueues(Query):
    work_pool_name: PoolName
    work_queues: WorkQueueFilter | None = None


class GetWorkQueueById(Query):
    id: uuid.UUID


class GetLegacyWorkQueue(Query):
    """WQ-10: by name, inside `default-agent-pool` only."""

    name: QueueName


class ListAllWorkQueues(Page):
    """WQ-10: every pool's queues, ordered by name ascending."""

    work_queues: WorkQueueFilter | None = None

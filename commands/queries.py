"""Query request schemas: what a client may ask the read side (BEHAVIOUR C-2, WP-7, WQ-7, WQ-10).

They live beside the commands because clients and the service share them; the answers come
from the Postgres read models in `projections/`.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .bounds import INT64_MAX, MAX_FILTER_VALUES, NonNegativeInt64, check_storable_text
from .flows import FlowName
from .work_pools import PoolName, QueueName

DEFAULT_LIMIT = 200


class Query(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_max_length=100_000)

    # Read-your-writes: wait (bounded) until the read model has applied this stream sequence
    # (checkpoints are `bigint`).
    min_seq: Annotated[int, Field(ge=0, le=INT64_MAX)] | None = None


class Page(Query):
    limit: Annotated[int, Field(ge=0, le=DEFAULT_LIMIT)] = DEFAULT_LIMIT
    offset: NonNegativeInt64 = 0  # Postgres OFFSET is a bigint


T = TypeVar("T")


def _storable_values(values: list[T] | None) -> list[T] | None:
    """Text values must be storable text (commands/bounds.py), like what they match."""
    for i, value in enumerate(values or ()):
        if isinstance(value, str):
            try:
                check_storable_text(value)
            except ValueError as e:
                raise ValueError(f"value {i} {e}") from None
    return values


class AnyOf(BaseModel, Generic[T]):
    """Matches any of the values. Every value is one bind parameter: at most
    `MAX_FILTER_VALUES` per list, so that a query with all its filters stays under asyncpg's
    32,767 parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_max_length=100_000)

    any_: Annotated[list[T], Field(max_length=MAX_FILTER_VALUES)] | None = None

    _storable = field_validator("any_")(_storable_values)


class AllOf(BaseModel, Generic[T]):
    """Matches what holds every value given (a flow with all these tags)."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_max_length=100_000)

    all_: Annotated[list[T], Field(max_length=MAX_FILTER_VALUES)] | None = None

    _storable = field_validator("all_")(_storable_values)


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
    """The queues of one pool, ordered by priority ascending."""

    work_pool_name: PoolName
    work_queues: WorkQueueFilter | None = None


class CountWorkQueues(Query):
    work_pool_name: PoolName
    work_queues: WorkQueueFilter | None = None


class GetWorkQueueById(Query):
    id: uuid.UUID


class GetLegacyWorkQueue(Query):
    """A queue by name, inside `default-agent-pool` only (the legacy queue API)."""

    name: QueueName


class ListAllWorkQueues(Page):
    """Every pool's queues, ordered by name ascending (the legacy queue API)."""

    work_queues: WorkQueueFilter | None = None



class FlowFilter(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: AnyOf[uuid.UUID] | None = None
    name: AnyOf[str] | None = None
    tags: AllOf[str] | None = None


class GetFlow(Query):
    id: uuid.UUID


class GetFlowByName(Query):
    name: FlowName


class ListFlows(Page):
    """Ordered by name ascending."""

    flows: FlowFilter | None = None


class CountFlows(Query):
    flows: FlowFilter | None = None

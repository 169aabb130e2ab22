"""Run states: what a flow run (and later a task run) is doing, with Prefect's names.

A state is minted by the service (its id and timestamp are never the client's); a client
proposes one (`StateCreate`) and the orchestration rules decide what is written
(`commands/orchestration_rules.py`).
"""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from .bounds import StoredText, UtcDatetime, check_json_document


class StateType(StrEnum):
    SCHEDULED = "SCHEDULED"
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    CRASHED = "CRASHED"
    PAUSED = "PAUSED"
    CANCELLING = "CANCELLING"


TERMINAL = frozenset({StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED})
# The states that hold a pool's, queue's or deployment's slot (SL-1, SL-2, OR-13 use their own
# subsets; see commands/slots.py when it exists).
ACTIVE = frozenset({StateType.PENDING, StateType.RUNNING, StateType.CANCELLING})


def default_name(state_type: StateType) -> str:
    """FR-1: the type capitalised word by word (`CANCELLING` -> `Cancelling`)."""
    return state_type.value.replace("_", " ").title().replace(" ", "")


StateName = Annotated[StoredText, StringConstraints(max_length=255)]
Message = Annotated[StoredText, StringConstraints(max_length=100_000)]


def _json_value(value: Any) -> Any:
    check_json_document({"": value})
    return value


# Text inside state details: stored in Postgres `jsonb`, so storable (no NUL), and bounded.
Key = Annotated[StoredText, StringConstraints(max_length=2_000)]
MAX_STORED_CACHE_KEY_LENGTH = 10_000


class StateDetails(BaseModel):
    """Prefect's `state_details`, key for key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    flow_run_id: uuid.UUID | None = None
    task_run_id: uuid.UUID | None = None
    child_flow_run_id: uuid.UUID | None = None
    scheduled_time: UtcDatetime | None = None
    # Beyond Prefect's cache limit (2000, a REJECT by the task rules, OR-14), a bound that only
    # keeps a state small enough to travel and be stored.
    cache_key: Annotated[StoredText, StringConstraints(max_length=MAX_STORED_CACHE_KEY_LENGTH)] | None = None
    cache_expiration: UtcDatetime | None = None
    deferred: bool | None = False
    untrackable_result: bool = False
    pause_timeout: UtcDatetime | None = None
    pause_reschedule: bool = False
    pause_key: Annotated[StoredText, StringConstraints(max_length=2_000)] | None = None
    run_input_keyset: Annotated[dict[Key, Key], Field(max_length=1_000)] | None = None
    refresh_cache: bool | None = None
    retriable: bool | None = None
    transition_id: uuid.UUID | None = None
    task_parameters_id: uuid.UUID | None = None
    traceparent: Annotated[StoredText, StringConstraints(max_length=2_000)] | None = None
    deployment_concurrency_lease_id: uuid.UUID | None = None


class StateCreate(BaseModel):
    """A proposed state, as a client sends it. A `timestamp` sent is ignored (the
    service mints it); `data` is any JSON."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: StateType
    name: StateName | None = None
    message: Message | None = None
    data: Annotated[Any, AfterValidator(_json_value)] = None
    state_details: StateDetails = StateDetails()
    timestamp: UtcDatetime | None = None


class State(BaseModel):
    """A written state, as stored and answered."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: uuid.UUID
    type: StateType
    name: str
    timestamp: UtcDatetime
    message: str | None = None
    data: Any = None
    state_details: StateDetails = StateDetails()

    @property
    def is_terminal(self) -> bool:
        return self.type in TERMINAL

    def reply(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class CreatedBy(BaseModel):
    """Who made a run or a deployment (Prefect's `CreatedBy`): a schedule, a user, an
    automation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: uuid.UUID | None = None
    type: Annotated[StoredText, StringConstraints(max_length=255)] | None = None
    display_value: Annotated[StoredText, StringConstraints(max_length=255)] | None = None

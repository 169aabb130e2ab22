"""What a decider returns: the events to append, the reply's result, and, for orchestration,
an explicit outcome.

A plain command either changes something (events) or is refused (`Rejection`, raised: nothing
is appended). Orchestration needs more than that: a proposed state can be accepted, replaced
by another (REJECT, and the replacement is written), delayed (WAIT) or refused (ABORT), and
the reason a run waits must reach its read model even when nothing is accepted. So a
`Decision` may carry an `Orchestration` whatever its events, and the command bus appends the
events and answers `ok` with the orchestration result beside the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from .messages import Event


class Outcome(StrEnum):
    """Prefect's orchestration statuses, with their meaning for the caller."""

    ACCEPT = "ACCEPT"  # the proposed state was written (possibly renamed or annotated)
    REJECT = "REJECT"  # another state was written instead, or nothing; `reason` says why
    WAIT = "WAIT"  # nothing written; try again after `delay_seconds`
    ABORT = "ABORT"  # nothing written; the caller should stop


@dataclass(frozen=True)
class Orchestration:
    """The outcome of a proposed transition, as the reply carries it:
    `{"status": ..., "details": {"reason": ..., "delay_seconds": ..., ...}}`."""

    status: Outcome
    reason: str | None = None
    delay_seconds: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status is Outcome.WAIT and self.delay_seconds is None:
            raise ValueError("a WAIT says how long to wait (delay_seconds)")
        if self.status in (Outcome.REJECT, Outcome.ABORT) and not self.reason:
            raise ValueError(f"a {self.status} says why (reason)")

    def as_reply(self) -> dict[str, Any]:
        details = dict(self.details)
        if self.reason is not None:
            details["reason"] = self.reason
        if self.delay_seconds is not None:
            details["delay_seconds"] = self.delay_seconds
        return {"status": str(self.status), "details": details}


@dataclass(frozen=True)
class NewEvent:
    """An event a decision produced, addressed to the aggregate it belongs to."""

    aggregate_id: str
    event: Event

    @property
    def aggregate_type(self) -> str:
        return self.event.aggregate_type


@dataclass
class Decision:
    """The events of one command, possibly across several aggregates, and the reply result.

    `orchestration`: set by deciders of proposed transitions; the events are appended whatever
    its status (a REJECT writes the replacement state, a WAIT may record why the run waits)."""

    events: list[NewEvent]
    result: Any = None
    created: bool | None = None
    # The state of an aggregate after these events, by aggregate id, where the decider has
    # already folded them (it needed the state for its result): the bus caches it as it is
    # instead of folding the events again. Keyed by id alone: the aggregates of one decision
    # must not share an id across types (a deployment's run index is `runs-<id>` for this).
    after: dict[str, Any] = field(default_factory=dict)
    orchestration: Orchestration | None = None
    # Task runs to queue on their key's subject once these events are stored.
    queue: list[QueuedTaskRun] = field(default_factory=list)


@dataclass(frozen=True)
class QueuedTaskRun:
    """A task run written SCHEDULED and deferred, to be published on its key's `side` (TQ-4)
    after its state is stored. `wait_seconds`: how long the publisher may wait for room on a
    full key before it gives up (the run is then cancelled and the caller told)."""

    task_key: str
    side: Literal["scheduled", "retry"]
    run: Any  # a TaskRun
    wait_seconds: float = 0

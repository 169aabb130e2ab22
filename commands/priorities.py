"""Work-queue priority rules of BEHAVIOUR §2 (WQ-2, PR-1…PR-4), as pure functions over
`{queue_id: priority}` maps, so the decider and the property tests share one implementation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

K = TypeVar("K")


class DuplicateTargetPriorities(ValueError):
    def __init__(self) -> None:
        super().__init__("Duplicate target priorities provided")


def next_free_priority(priorities: list[int]) -> int:
    """WQ-2: the first 1-based position whose priority differs from it, else max + 1."""
    ordered = sorted(priorities)
    if not ordered:
        return 1
    if ordered[-1] == len(ordered) and ordered == list(range(1, len(ordered) + 1)):
        return len(ordered) + 1  # no gap: the common case, checked without a Python loop
    for position, priority in enumerate(ordered, start=1):
        if priority != position:
            return position
    return len(ordered) + 1 if not ordered else ordered[-1] + 1


def reprioritize(current: Mapping[K, int], targets: Mapping[K, int]) -> dict[K, int]:
    """PR-1: the new priority of every queue. Targets for unknown queues are ignored.

    Keeps the order, moves only as many queues as needed down by +1 steps, never closes gaps;
    a moved queue whose target exceeds every other priority is not inserted (the PR-3 quirk).
    """
    if len(set(targets.values())) != len(targets):
        raise DuplicateTargetPriorities()
    targets = {k: v for k, v in targets.items() if k in current}
    # Stable sort by current priority: ties keep their insertion order (PR-5: any order).
    by_priority = sorted(current, key=lambda k: current[k])
    others = [k for k in by_priority if k not in targets]
    result = dict(current)
    for queue in sorted(targets, key=lambda k: targets[k]):
        target = targets[queue]
        result[queue] = target
        for index, other in enumerate(others):
            if result[other] >= target:
                others.insert(index, queue)
                break
    last = 0
    for queue in others:
        if result[queue] <= last:
            result[queue] = last + 1
            last += 1
        else:
            last = result[queue]
    return result

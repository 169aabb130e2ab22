"""Work-queue priorities: WQ-2, WQ-3, PR-1…PR-4 (BEHAVIOUR §2), pure, no I/O.

Three layers are checked against each other:

* the worked examples of the spec, literally, through `priorities.py` and through the real
  deciders of `work_pools.py` (folding their events with `evolve`);
* `spec_pr1` / `spec_next_free`, a second, independent implementation written straight from
  the text of PR-1 steps 1–4 and WQ-2 (not derived from `priorities.py`);
* hypothesis: from any state (gaps and duplicates included) and any sequence of creates,
  updates, legacy by-id updates, deletes and bulk maps applied through the deciders, the
  stored priorities equal the reference model's, and the PR-1 invariants hold.

Ambiguity resolved here: PR-1 step 2 sorts by current priority and says nothing about ties
(PR-5 allows any order for reads). The deciders break ties by the order the queues were
created in the pool; the reference model does the same, so the tests pin that choice.
"""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runledger.commands import work_pools as wp
from runledger.commands.messages import DecisionContext, Rejection
from runledger.commands.priorities import (
    DuplicateTargetPriorities,
    next_free_priority,
    reprioritize,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


# ---------------------------------------------------------------------------------------------
# The reference model, straight from the spec text


class SpecDuplicateTargets(Exception):
    pass


def spec_pr1(queues: list[tuple[str, int]], targets: dict[str, int]) -> dict[str, int]:
    """PR-1, literally. `queues` is `(queue, current priority)` in listing order; equal
    priorities keep that order when sorted (the tie-break the tests pin, see module doc)."""
    # 1. Two targets sharing a value -> error, nothing changes. Unknown targets are ignored.
    if len(set(targets.values())) != len(targets):
        raise SpecDuplicateTargets()
    known = {name for name, _ in queues}
    targets = {name: p for name, p in targets.items() if name in known}
    # 2. Sort all queues by current priority ascending; split into `others` and `moved`.
    ordered = sorted(queues, key=lambda row: row[1])
    others = [[name, p] for name, p in ordered if name not in targets]
    moved = [[name, p] for name, p in ordered if name in targets]
    # 3. Moved queues in ascending target order: give each its target, then insert it just
    #    before the first queue (of the list as it now stands) whose priority is >= target.
    #    If there is none, it is not inserted: it keeps its target and skips step 4.
    not_inserted: dict[str, int] = {}
    for row in sorted(moved, key=lambda r: targets[r[0]]):
        row[1] = targets[row[0]]
        position = None
        for index, other in enumerate(others):
            if other[1] >= row[1]:
                position = index
                break
        if position is None:
            not_inserted[row[0]] = row[1]
        else:
            others.insert(position, row)
    # 4. Walk with last = 0: priority <= last -> last + 1 (and last += 1); else last = priority.
    last = 0
    for row in others:
        if row[1] <= last:
            row[1] = last + 1
            last += 1
        else:
            last = row[1]
    result = {name: p for name, p in others}
    result.update(not_inserted)
    return result


def spec_next_free(priorities: list[int]) -> int:
    """WQ-2, literally: sorted ascending, walk with a 1-based counter; the first position i
    whose priority is not i gives i; no gap -> max + 1 (1 for an empty pool)."""
    ordered = sorted(priorities)
    counter = 1
    for p in ordered:
        if p != counter:
            return counter
        counter += 1
    return ordered[-1] + 1 if ordered else 1


def layout(text: str) -> dict[str, int]:
    """`"A1 B2 default3"` -> `{"A": 1, "B": 2, "default": 3}`."""
    out = {}
    for item in text.split():
        name = item.rstrip("0123456789")
        out[name] = int(item[len(name):])
    return out


# ---------------------------------------------------------------------------------------------
# Driving the real deciders


class Pool:
    """One pool, driven only through the public deciders, folding their events with `evolve`."""

    def __init__(self, type_: str = "process"):
        self._ids = (uuid.UUID(int=i) for i in itertools.count(1))
        d = wp.decide_create_work_pool(wp.CreateWorkPool(name="p", type=type_), wp.WorkPoolNameClaim(), self.ctx())
        self.state: wp.WorkPool = self._fold(None, d)

    def ctx(self) -> DecisionContext:
        return DecisionContext.fixed(NOW, self._ids)

    @staticmethod
    def _fold(state, decision):
        for e in decision.events:
            if e.aggregate_type == wp.WORK_POOL:
                state = wp.evolve(state, e.event)
        return state

    def apply(self, decision) -> wp.Decision:
        self.state = self._fold(self.state, decision)
        return decision

    def create(self, name: str, priority: int | None = None) -> wp.Decision:
        cmd = wp.CreateWorkQueue(work_pool_name="p", name=name, priority=priority)
        return self.apply(wp.decide_create_work_queue(cmd, self.state, self.ctx()))

    def update(self, queue_name: str, /, **fields) -> wp.Decision:
        cmd = wp.UpdateWorkQueue(work_pool_name="p", work_queue_name=queue_name, **fields)
        return self.apply(wp.decide_update_work_queue(cmd, self.state, self.ctx()))

    def update_by_id(self, queue_id: uuid.UUID, **fields) -> wp.Decision:
        cmd = wp.UpdateWorkQueueById(id=queue_id, **fields)
        return self.apply(wp.decide_update_work_queue_by_id(cmd, self.state, self.ctx()))

    def delete(self, name: str) -> wp.Decision:
        cmd = wp.DeleteWorkQueue(work_pool_name="p", work_queue_name=name)
        return self.apply(wp.decide_delete_work_queue(cmd, self.state, self.ctx()))

    def bulk(self, priorities: dict[str, int]) -> wp.Decision:
        cmd = wp.SetWorkQueuePriorities(work_pool_name="p", priorities=priorities)
        return self.apply(wp.decide_set_work_queue_priorities(cmd, self.state, self.ctx()))

    def id_of(self, name: str) -> uuid.UUID:
        return self.state.queue_named(name).id

    def layout(self) -> dict[str, int]:
        return {q.name: q.priority for q in self.state.queues.values()}


def pool_with(text: str) -> Pool:
    """A pool whose queues have exactly the priorities of `text` (the default queue renamed
    to the first name unless `default` is listed); set with legacy by-id updates (WQ-11:
    stored as given) so any state, duplicates included, can be built."""
    wanted = layout(text)
    pool = Pool()
    if "default" not in wanted:
        pool.update("default", name=next(iter(wanted)))
    for name in wanted:
        if pool.state.queue_named(name) is None:
            pool.create(name)
    for name, priority in wanted.items():
        pool.update_by_id(pool.id_of(name), priority=priority)
    assert pool.layout() == wanted
    return pool


PR2_EXAMPLES = [
    ({"A": 2}, "A2 B3 C4 D5 E6"),
    ({"A": 2, "B": 4}, "A2 C3 B4 D5 E6"),
    ({"A": 2, "B": 4, "C": 1}, "C1 A2 B4 D5 E6"),
    ({"A": 2, "B": 1}, "B1 A2 C3 D4 E5"),
    ({"B": 2, "C": 3, "D": 4, "E": 5}, "A1 B2 C3 D4 E5"),
    ({"E": 1}, "E1 A2 B3 C4 D5"),
    ({"A": 5}, "B2 C3 D4 A5 E6"),
    ({"D": 2}, "A1 D2 B3 C4 E5"),
    ({}, "A1 B2 C3 D4 E5"),
]
ABCDE = "A1 B2 C3 D4 E5"


# ---------------------------------------------------------------------------------------------
# WQ-2


@pytest.mark.parametrize(
    "existing, expected",
    [([1], 2), ([1, 2, 3], 4), ([1, 99], 2), ([2, 3], 1), ([], 1), ([3, 1, 2], 4), ([1, 1], 2), ([2, 2], 1),
     ([1, 3, 3], 2), ([5], 1), ([1, 2, 4, 5], 3)],
)
def test_wq2_next_free_priority_examples(existing, expected):
    assert next_free_priority(existing) == expected
    assert spec_next_free(existing) == expected


@pytest.mark.parametrize(
    "state, expected",
    [("default1", 2), ("default1 A2 B3", 4), ("default1 A99", 2), ("default2 A3", 1), ("default1 A1", 2)],
)
def test_wq2_through_the_decider_and_no_other_queue_changes(state, expected):
    pool = pool_with(state)
    before = pool.layout()
    d = pool.create("new")
    (event,) = [e.event for e in d.events]
    assert isinstance(event, wp.WorkQueueCreated)
    assert event.queue.priority == expected
    assert event.reprioritized == {}
    assert pool.layout() == {**before, "new": expected}


def test_wq2_examples_built_only_through_pool_api_commands():
    # [1] -> 2
    pool = Pool()
    assert pool.create("A").result[1].priority == 2
    # [1, 2, 3] -> 4
    pool.create("B")
    assert pool.layout() == {"default": 1, "A": 2, "B": 3}
    assert pool.create("C").result[1].priority == 4
    # [1, 99] -> 2: a priority above every other is not inserted and moves nothing
    pool = Pool()
    d = pool.create("A", priority=99)
    assert d.events[0].event.reprioritized == {}
    assert pool.layout() == {"default": 1, "A": 99}
    assert pool.create("B").result[1].priority == 2
    # [2, 3] -> 1
    pool = Pool()
    pool.update("default", priority=2)
    pool.create("A", priority=3)
    assert pool.layout() == {"default": 2, "A": 3}
    assert pool.create("B").result[1].priority == 1


def test_wq9_first_user_queue_in_the_legacy_pool_gets_priority_2():
    ctx = DecisionContext.fixed(NOW, (uuid.UUID(int=i) for i in itertools.count(1)))
    d = wp.decide_create_legacy_work_queue(wp.CreateLegacyWorkQueue(name="q"), wp.WorkPoolNameClaim(), None, ctx)
    pool, queue = d.result
    assert queue.priority == 2
    assert {q.name: q.priority for q in pool.queues.values()} == {"default": 1, "q": 2}


# ---------------------------------------------------------------------------------------------
# WQ-3


def test_wq3_example_create_with_priority_1_pushes_the_default_down():
    pool = Pool()
    default_id = pool.state.default_queue_id
    d = pool.create("A", priority=1)
    (event,) = [e.event for e in d.events]
    assert event.queue.priority == 1
    assert event.reprioritized == {default_id: 2}
    assert pool.layout() == {"A": 1, "default": 2}
    assert d.result[0] == pool.state and d.result[1] == pool.state.queue_named("A")


@pytest.mark.parametrize(
    "state, priority, expected",
    [
        ("default1 A2 B3", 2, "default1 new2 A3 B4"),
        ("default1 A2 B3", 3, "default1 A2 new3 B4"),
        ("default1 A2 B3", 4, "default1 A2 B3 new4"),
        ("default1 A2 B3", 50, "default1 A2 B3 new50"),
        ("default1 A3 B4", 2, "default1 new2 A3 B4"),  # lands in a gap: nothing moves
        ("default1 A2 B5", 2, "default1 new2 A3 B5"),  # only as many as needed move
        ("default1 A1", 1, "new1 default2 A3"),  # pre-existing duplicates are separated too
    ],
)
def test_wq3_create_with_priority_runs_pr1(state, priority, expected):
    pool = pool_with(state)
    before = pool.layout()
    d = pool.create("new", priority=priority)
    assert pool.layout() == layout(expected)
    moved = d.events[0].event.reprioritized
    assert {pool.state.queues[qid].name: p for qid, p in moved.items()} == {
        n: p for n, p in layout(expected).items() if n != "new" and before[n] != p
    }


# ---------------------------------------------------------------------------------------------
# PR-1 / PR-2 worked examples


@pytest.mark.parametrize("targets, expected", PR2_EXAMPLES)
def test_pr2_examples_through_reprioritize(targets, expected):
    assert reprioritize(layout(ABCDE), targets) == layout(expected)


@pytest.mark.parametrize("targets, expected", PR2_EXAMPLES)
def test_pr2_examples_through_the_reference_model(targets, expected):
    assert spec_pr1(list(layout(ABCDE).items()), targets) == layout(expected)


@pytest.mark.parametrize("targets, expected", PR2_EXAMPLES)
def test_pr2_examples_through_the_bulk_decider(targets, expected):
    pool = pool_with(ABCDE)
    before = pool.layout()
    d = pool.bulk(targets)
    assert pool.layout() == layout(expected)
    changed = {n: p for n, p in layout(expected).items() if before[n] != p}
    if changed:
        (event,) = [e.event for e in d.events]
        assert isinstance(event, wp.WorkQueuesReprioritized)
        assert {pool.state.queues[qid].name: p for qid, p in event.reprioritized.items()} == changed
        assert event.updated == NOW
        assert d.result == pool.state
    else:
        assert d.events == []  # nothing moved: no event


@pytest.mark.parametrize("targets, expected", [(t, e) for t, e in PR2_EXAMPLES if len(t) == 1])
def test_pr2_single_target_examples_through_the_update_decider(targets, expected):
    pool = pool_with(ABCDE)
    ((name, priority),) = targets.items()
    d = pool.update(name, priority=priority)
    assert pool.layout() == layout(expected)
    (event,) = [e.event for e in d.events]
    assert event.queue.priority == priority
    assert event.changes["priority"].model_dump() == {"old": layout(ABCDE)[name], "new": priority}
    assert {pool.state.queues[qid].name: p for qid, p in event.reprioritized.items()} == {
        n: p for n, p in layout(expected).items() if n != name and layout(ABCDE)[n] != p
    }


def test_pr2_empty_map_keeps_gaps():
    assert reprioritize(layout("A1 B2 D4 E5"), {}) == layout("A1 B2 D4 E5")
    pool = pool_with("A1 B2 D4 E5")
    assert pool.bulk({}).events == []
    assert pool.layout() == layout("A1 B2 D4 E5")


def test_pr2_other_example_default_c_a_b_with_a_100():
    expected = layout("default1 C2 B4 A100")
    assert reprioritize(layout("default1 C2 A3 B4"), {"A": 100}) == expected
    # Built only through pool-API commands: A, B get 2, 3; C created at 2 pushes them to 3, 4.
    pool = Pool()
    pool.create("A")
    pool.create("B")
    pool.create("C", priority=2)
    assert pool.layout() == layout("default1 C2 A3 B4")
    pool.update("A", priority=100)
    assert pool.layout() == expected
    pool = Pool()
    pool.create("A")
    pool.create("B")
    pool.create("C", priority=2)
    pool.bulk({"A": 100})
    assert pool.layout() == expected


def test_pr1_duplicate_targets_are_rejected_and_nothing_changes():
    with pytest.raises(DuplicateTargetPriorities) as info:
        reprioritize(layout(ABCDE), {"A": 3, "B": 3})
    assert str(info.value) == "Duplicate target priorities provided"
    pool = pool_with(ABCDE)
    before = pool.state
    with pytest.raises(Rejection) as info:
        pool.bulk({"A": 3, "B": 3})
    assert (info.value.code, info.value.message, info.value.field) == (
        "invalid", "Duplicate target priorities provided", "priorities")
    assert pool.state is before


def test_pr1_duplicate_check_covers_unknown_targets_too():
    # Step 1 checks the map as given; only then are unknown targets ignored.
    with pytest.raises(DuplicateTargetPriorities):
        reprioritize(layout(ABCDE), {"A": 3, "nope": 3})
    pool = pool_with(ABCDE)
    with pytest.raises(Rejection) as info:
        pool.bulk({"A": 3, "nope": 3})
    assert info.value.code == "invalid"
    assert pool.layout() == layout(ABCDE)


def test_pr1_unknown_targets_are_ignored():
    assert reprioritize(layout(ABCDE), {"Z": 1}) == layout(ABCDE)
    assert reprioritize(layout(ABCDE), {"Z": 1, "A": 2}) == layout("A2 B3 C4 D5 E6")
    pool = pool_with(ABCDE)
    assert pool.bulk({"Z": 1, "Y": 2}).events == []
    pool.bulk({"Z": 1, "A": 2})
    assert pool.layout() == layout("A2 B3 C4 D5 E6")


def test_pr1_bulk_on_a_missing_pool_is_not_found():
    with pytest.raises(Rejection) as info:
        wp.decide_set_work_queue_priorities(
            wp.SetWorkQueuePriorities(work_pool_name="gone", priorities={"a": 1}), None, DecisionContext.fixed(NOW))
    assert (info.value.code, info.value.message) == ("not_found", 'Work pool "gone" not found.')


def test_pr1_a_target_can_be_bumped_by_an_earlier_move():
    # Literal step 3/4: N goes before X, X is pushed onto M's target, which pushes M.
    assert spec_pr1([("X", 1), ("Y", 2), ("M", 7), ("N", 8)], {"M": 2, "N": 1}) == {"N": 1, "X": 2, "M": 3, "Y": 4}
    assert reprioritize({"X": 1, "Y": 2, "M": 7, "N": 8}, {"M": 2, "N": 1}) == {"N": 1, "X": 2, "M": 3, "Y": 4}


# ---------------------------------------------------------------------------------------------
# PR-3 quirk


def test_pr3_duplicates_are_possible():
    assert reprioritize(layout("A1 B2 C3"), {"A": 2, "C": 3}) == layout("A2 B3 C3")
    assert spec_pr1(list(layout("A1 B2 C3").items()), {"A": 2, "C": 3}) == layout("A2 B3 C3")
    pool = pool_with("A1 B2 C3")
    pool.bulk({"A": 2, "C": 3})
    assert pool.layout() == layout("A2 B3 C3")
    # the duplicates stay until something moves them; WQ-2 then sees [2, 3, 3] -> 1
    assert pool.create("D").result[1].priority == 1
    # a later empty map (a delete) separates them: walk A2 B3 C3 -> C4 (C is after B: created later)
    pool.delete("D")
    assert pool.layout() == layout("A2 B3 C4")


# ---------------------------------------------------------------------------------------------
# PR-4


def test_pr4_delete_does_not_renumber():
    pool = Pool()
    for n in "ABC":
        pool.create(n)
    assert pool.layout() == layout("default1 A2 B3 C4")
    d = pool.delete("B")
    (event,) = [e.event for e in d.events]
    assert isinstance(event, wp.WorkQueueDeleted)
    assert (event.name, event.reprioritized, event.deleted) == ("B", {}, NOW)
    assert pool.layout() == layout("default1 A2 C4")
    assert d.result is None
    # the hole is reused by WQ-2, and nobody else moves
    assert pool.create("D").result[1].priority == 3
    assert pool.layout() == layout("default1 A2 D3 C4")


def test_pr4_delete_keeps_gaps_everywhere():
    pool = pool_with("default1 A5 B9 C20")
    pool.delete("B")
    assert pool.layout() == layout("default1 A5 C20")
    pool.delete("A")
    assert pool.layout() == layout("default1 C20")


def test_pr4_delete_separates_duplicates_like_pr1_with_an_empty_map():
    pool = pool_with("default1 A2 B2 C2 D9")
    d = pool.delete("D")
    assert pool.layout() == layout("default1 A2 B3 C4")
    assert {pool.state.queues[q].name: p for q, p in d.events[0].event.reprioritized.items()} == {"B": 3, "C": 4}


# ---------------------------------------------------------------------------------------------
# WQ-11 (the legacy by-id update skips PR-1) and WQ-5 (the pool API runs it)


def test_wq11_update_by_id_stores_the_priority_as_given():
    pool = pool_with("default1 A2 B3")
    d = pool.update_by_id(pool.id_of("B"), priority=1)
    assert d.events[0].event.reprioritized == {}
    assert pool.layout() == layout("default1 A2 B1")  # duplicates possible


def test_wq5_update_through_the_pool_api_runs_pr1():
    pool = pool_with("default1 A2 B3")
    pool.update("B", priority=1)
    assert pool.layout() == layout("B1 default2 A3")


def test_wq5_same_priority_again_is_no_event():
    pool = pool_with("default1 A2 B3")
    assert pool.update("A", priority=2).events == []
    pool.update("A", priority=7)
    assert pool.update("A", priority=7).events == []
    assert pool.layout() == layout("default1 B3 A7")


# ---------------------------------------------------------------------------------------------
# Properties


priorities_st = st.integers(1, 14)
names = ["default", "A", "B", "C", "D", "E", "F"]


def _check_pr1_invariants(before: dict[str, int], order: list[str], targets: dict[str, int], after: dict[str, int]):
    """Order kept, only downward moves, gaps never closed — for the queues not targeted."""
    targets = {k: v for k, v in targets.items() if k in before}
    rest = [k for k in order if k not in targets]
    assert set(after) == set(before)
    for k in rest:
        assert after[k] >= before[k], "priorities only move down"
    for a, b in itertools.combinations(rest, 2):
        if before[a] < before[b]:
            assert after[a] < after[b], "order is kept"
        elif before[a] > before[b]:
            assert after[a] > after[b], "order is kept"
        else:
            assert after[a] != after[b], "ties among untouched queues are separated"
    taken = set(after.values())
    for k in rest:
        if after[k] != before[k]:
            # pushed by exactly one step past a neighbour, never moved into a freed hole
            assert after[k] - 1 in taken, "a queue moves only when pushed"
    # A target exceeding every other priority stays where it was put (the PR-3 rule).
    for k, t in targets.items():
        if all(before[o] < t for o in before if o not in targets) and all(
            t2 < t for o, t2 in targets.items() if o != k
        ):
            assert after[k] == t


@settings(max_examples=300, deadline=None)
@given(
    st.lists(priorities_st, min_size=1, max_size=8),
    st.dictionaries(st.integers(0, 10), st.integers(1, 16), max_size=5),
)
def test_reprioritize_equals_the_reference_from_any_state(prios, raw_targets):
    current = {f"q{i}": p for i, p in enumerate(prios)}
    targets = {f"q{i}": p for i, p in raw_targets.items()}  # q8..q10 are unknown
    order = list(current)
    try:
        expected = spec_pr1(list(current.items()), targets)
    except SpecDuplicateTargets:
        with pytest.raises(DuplicateTargetPriorities):
            reprioritize(current, targets)
        return
    after = reprioritize(current, targets)
    assert after == expected
    assert current == {f"q{i}": p for i, p in enumerate(prios)}  # input not mutated
    _check_pr1_invariants(current, order, targets, after)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=10, unique=True), st.data())
def test_single_target_on_a_duplicate_free_state(prios, data):
    current = {f"q{i}": p for i, p in enumerate(prios)}
    queue = data.draw(st.sampled_from(sorted(current)))
    target = data.draw(st.integers(1, 45))
    after = reprioritize(current, {queue: target})
    assert after[queue] == target  # the target is reached exactly
    assert len(set(after.values())) == len(after)  # and no duplicate appears
    assert reprioritize(after, {queue: target}) == after  # idempotent
    assert reprioritize(current, {}) == current  # the empty map never closes gaps


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 30), max_size=25))
def test_next_free_priority_equals_the_reference(prios):
    free = next_free_priority(prios)
    assert free == spec_next_free(prios)
    assert set(range(1, free)) <= set(prios)  # every priority above it is taken
    if len(set(prios)) == len(prios):
        assert free not in prios  # without duplicates the result is always free


@st.composite
def initial_states(draw):
    """The default queue plus up to five others, with any positive priorities (gaps and
    duplicates included)."""
    n = draw(st.integers(0, 5))
    return draw(st.lists(priorities_st, min_size=n + 1, max_size=n + 1))


op_name = st.sampled_from([*names, "G"])
operations = st.one_of(
    st.tuples(st.just("create"), op_name, st.none() | priorities_st),
    st.tuples(st.just("update"), op_name, priorities_st),
    st.tuples(st.just("update_by_id"), op_name, priorities_st),
    st.tuples(st.just("delete"), op_name, st.none()),
    st.tuples(st.just("bulk"), st.dictionaries(op_name, priorities_st, max_size=4), st.none()),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(initial_states(), st.lists(operations, max_size=20))
def test_any_sequence_through_the_deciders_equals_the_reference_model(initial, ops):
    pool = Pool()
    state_names = names[: len(initial)]
    for n in state_names[1:]:
        pool.create(n)
    for n, p in zip(state_names, initial, strict=True):
        pool.update_by_id(pool.id_of(n), priority=p)
    model = dict(zip(state_names, initial, strict=True))
    order = list(state_names)  # creation order: the tie-break of PR-1 step 2
    assert pool.layout() == model

    for kind, arg, value in ops:
        before = dict(model)
        before_state = pool.state
        targets: dict[str, int] | None = None
        expected_error = None
        if kind == "create":
            if arg in model:
                expected_error = "conflict"
            elif value is None:
                model[arg] = spec_next_free(list(model.values()))
                order.append(arg)
            else:
                order.append(arg)
                targets = {arg: value}
                model = spec_pr1([(n, before.get(n, value)) for n in order], targets)
        elif kind == "update":
            if arg not in model:
                expected_error = "not_found"
            else:
                targets = {arg: value}
                model = spec_pr1([(n, model[n]) for n in order], targets)
        elif kind == "update_by_id":
            if arg not in model:
                expected_error = "not_found"
            else:
                model[arg] = value  # WQ-11: as given, no PR-1
        elif kind == "delete":
            if arg not in model:
                expected_error = "not_found"
            elif arg == "default":
                expected_error = "conflict"  # WQ-6
            else:
                order.remove(arg)
                del model[arg]
                targets = {}
                model = spec_pr1([(n, model[n]) for n in order], targets)
        else:
            try:
                targets = dict(arg)
                model = spec_pr1([(n, model[n]) for n in order], targets)
            except SpecDuplicateTargets:
                expected_error = "invalid"

        try:
            if kind == "create":
                d = pool.create(arg, value)
            elif kind == "update":
                d = pool.update(arg, priority=value)
            elif kind == "update_by_id":
                queue_id = pool.id_of(arg) if arg in before else uuid.UUID(int=10**9)
                d = pool.update_by_id(queue_id, priority=value)
            elif kind == "delete":
                d = pool.delete(arg)
            else:
                d = pool.bulk(arg)
        except Rejection as r:
            assert r.code == expected_error, (kind, arg, value, r)
            assert pool.state is before_state  # a rejection changes nothing
            continue
        assert expected_error is None, (kind, arg, value)
        assert pool.layout() == model, (kind, arg, value)

        # Events: exactly the queues whose priority changed are reported.
        moved = {}
        for e in d.events:
            moved.update({pool.state.queues[q].name: p for q, p in getattr(e.event, "reprioritized", {}).items()})
        subject = arg if kind in ("create", "update", "update_by_id") else None
        expected_moved = {n: p for n, p in model.items() if n != subject and n in before and before[n] != p}
        assert moved == expected_moved
        if kind in ("update", "update_by_id", "bulk") and model == before:
            assert d.events == []  # nothing changed: no event

        # PR-1 invariants for every operation that ran it.
        if targets is not None:
            if kind == "create":
                start = {**before, arg: value}
            elif kind == "delete":
                start = {n: before[n] for n in order}
            else:
                start = before
            _check_pr1_invariants(start, [n for n in order if n in start], targets, model)

"""PR-1 through the real deciders, against a literal reference of the spec's algorithm:
from any state and any sequence of creates, updates, deletes and bulk maps, the priorities
the deciders produce equal the reference's. No I/O."""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from runledger.commands import work_pools as wp
from runledger.commands.messages import DecisionContext, Rejection
from runledger.commands.priorities import next_free_priority, reprioritize

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def reference_pr1(current: dict[str, int], order: list[str], targets: dict[str, int]) -> dict[str, int]:
    """BEHAVIOUR PR-1 steps 1–4, written straight from the text. `order` breaks ties in
    current priority (the order queues were listed in)."""
    targets = {k: v for k, v in targets.items() if k in current}
    ranked = sorted(order, key=lambda k: current[k])
    others = [k for k in ranked if k not in targets]
    prio = dict(current)
    for q in sorted(targets, key=lambda k: targets[k]):
        prio[q] = targets[q]
        for i, o in enumerate(others):
            if prio[o] >= targets[q]:
                others.insert(i, q)
                break
    last = 0
    for q in others:
        if prio[q] <= last:
            prio[q] = last + 1
            last += 1
        else:
            last = prio[q]
    return prio


def reference_free(priorities: list[int]) -> int:
    """WQ-2 literally: walk the sorted priorities with a 1-based counter."""
    ordered = sorted(priorities)
    for i, p in enumerate(ordered, start=1):
        if p != i:
            return i
    return (max(ordered) + 1) if ordered else 1


@given(st.lists(st.integers(1, 30), max_size=25))
def test_next_free_priority_matches_the_rule(priorities):
    assert next_free_priority(priorities) == reference_free(priorities)


@given(st.dictionaries(st.sampled_from("ABCDEFGHIJ"), st.integers(1, 20), min_size=1),
       st.dictionaries(st.sampled_from("ABCDEFGHIJKL"), st.integers(1, 25), max_size=5))
def test_reprioritize_matches_the_reference(current, targets):
    if len(set(targets.values())) != len(targets):
        return  # step 1 rejects these; covered below
    assert reprioritize(current, targets) == reference_pr1(current, list(current), targets)


@given(st.dictionaries(st.sampled_from("ABCDEF"), st.integers(1, 10), min_size=2))
def test_order_is_kept_and_queues_only_move_down(current):
    untouched = [k for k in current]
    target = {untouched[0]: 1}
    after = reprioritize(current, target)
    rest = [k for k in sorted(current, key=lambda k: current[k]) if k not in target]
    assert [after[k] for k in rest] == sorted(after[k] for k in rest)
    assert all(after[k] >= current[k] for k in rest)


def test_duplicate_targets_change_nothing():
    pool = _pool_with(["A", "B"])
    try:
        wp.decide_set_work_queue_priorities(
            wp.SetWorkQueuePriorities(work_pool_name="p", priorities={"A": 3, "B": 3}), pool, _ctx())
    except Rejection as r:
        assert (r.code, r.message) == ("invalid", "Duplicate target priorities provided")
    else:
        raise AssertionError("expected a rejection")


_IDS = (uuid.UUID(int=i) for i in itertools.count(1))


def _ctx() -> DecisionContext:
    return DecisionContext.fixed(NOW, _IDS)


def _pool_with(names: list[str]) -> wp.WorkPool:
    ctx = _ctx()
    pool = wp.decide_create_work_pool(wp.CreateWorkPool(name="p", type="process"), wp.WorkPoolNameClaim(), ctx).result
    for n in names:
        d = wp.decide_create_work_queue(wp.CreateWorkQueue(work_pool_name="p", name=n), pool, ctx)
        for e in d.events:
            pool = wp.evolve(pool, e.event)
    return pool


operation = st.one_of(
    st.tuples(st.just("create"), st.sampled_from("ABCDEFGH"), st.one_of(st.none(), st.integers(1, 12))),
    st.tuples(st.just("update"), st.sampled_from("ABCDEFGH"), st.integers(1, 12)),
    st.tuples(st.just("delete"), st.sampled_from("ABCDEFGH"), st.none()),
    st.tuples(st.just("bulk"), st.dictionaries(st.sampled_from("ABCDEFGH") | st.just("default"), st.integers(1, 12), max_size=4), st.none()),
)


@settings(max_examples=250, deadline=None)
@given(st.lists(operation, max_size=25))
def test_any_sequence_of_operations_matches_the_reference_model(ops):
    ctx = _ctx()
    pool = wp.decide_create_work_pool(wp.CreateWorkPool(name="p", type="process"), wp.WorkPoolNameClaim(), ctx).result
    model: dict[str, int] = {"default": 1}
    order: list[str] = ["default"]  # listing order, for ties among equal priorities

    def apply(decision) -> None:
        nonlocal pool
        for e in decision.events:
            pool = wp.evolve(pool, e.event)

    for kind, arg, value in ops:
        try:
            if kind == "create":
                d = wp.decide_create_work_queue(wp.CreateWorkQueue(work_pool_name="p", name=arg, priority=value), pool, ctx)
                if value is None:
                    model[arg] = reference_free(list(model.values()))
                else:
                    model[arg] = value
                    model = reference_pr1(model, [*order, arg], {arg: value})
                order.append(arg)
            elif kind == "update":
                d = wp.decide_update_work_queue(
                    wp.UpdateWorkQueue(work_pool_name="p", work_queue_name=arg, priority=value), pool, ctx)
                model = reference_pr1(model, order, {arg: value})
            elif kind == "delete":
                d = wp.decide_delete_work_queue(wp.DeleteWorkQueue(work_pool_name="p", work_queue_name=arg), pool, ctx)
                del model[arg]
                order.remove(arg)
                model = reference_pr1(model, order, {})
            else:
                d = wp.decide_set_work_queue_priorities(wp.SetWorkQueuePriorities(work_pool_name="p", priorities=arg), pool, ctx)
                model = reference_pr1(model, order, {k: v for k, v in arg.items() if k in model})
        except Rejection as r:
            # the only rejections: a name that exists or does not, the default queue, duplicate targets
            assert r.code in ("conflict", "not_found", "invalid")
            if kind == "create":
                assert arg in model
            elif kind in ("update", "delete"):
                assert arg not in model or arg == "default"
            else:
                assert len(set(arg.values())) != len(arg)
            continue
        apply(d)
        assert {q.name: q.priority for q in pool.queues.values()} == model

"""A subflow's states on its parent task run (FR-6, Prefect's UpdateSubflowParentTask).

A subflow runs inside a task run of its parent flow run (`parent_task_run_id`), which stands
for it there: every state written for the subflow is copied onto that task run, forced (the
subflow's own rules have decided already), naming the subflow in `child_flow_run_id`. Both
aggregates change in one decision, appended at once, so the parent never shows a state its
subflow did not reach, nor misses one it did.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from . import tag_concurrency_limits as tcl
from . import task_run_rules
from . import task_runs as tr
from .decisions import Decision
from .flow_runs import FlowRun
from .messages import DecisionContext, not_found
from .states import StateCreate


def state_written(decision: Decision, before: FlowRun | None, run_id: str) -> FlowRun | None:
    """The subflow after `decision` when the decision wrote it a new state (None: it wrote
    none, or the run is not a subflow)."""
    after = decision.after.get(run_id)
    if not isinstance(after, FlowRun) or after.parent_task_run_id is None or after.state is None:
        return None
    if before is not None and before.state_id == after.state_id:
        return None
    return after


@dataclass(frozen=True)
class ParentTask:
    """A subflow's parent task run and what the forced rules copying a state onto it read
    (`facts`), as the handler loaded them."""

    run: tr.TaskRun
    facts: task_run_rules.TaskFacts = task_run_rules.NO_FACTS

    def after(self, decision: Decision) -> ParentTask:
        """The parent as `decision` left it: its run, and the limits of its tags and its cache
        key as the copy's events changed them. Two subflows of one decision naming one parent
        copy their states one on top of the other, each seeing what the one before wrote."""
        run = decision.after.get(str(self.run.id), self.run)
        limits = dict(self.facts.tag_limits)
        tags = {tcl.limit_id(tag): tag for tag in limits}
        cached = self.facts.cached
        for new in decision.events:
            if new.aggregate_type == tcl.TAG_CONCURRENCY_LIMIT and new.aggregate_id in tags:
                evolved = tcl.evolve(limits[tags[new.aggregate_id]], new.event)
                if evolved is not None:
                    limits[tags[new.aggregate_id]] = evolved
            elif new.aggregate_type == tr.TASK_CACHE and (cached is None
                                                          or new.aggregate_id == tr.cache_id(cached.cache_key)):
                cached = tr.evolve_cache(cached, new.event)
        return ParentTask(run=run, facts=dataclasses.replace(
            self.facts, tag_limits=limits, cached=cached,
            global_tag_limits=tcl.global_limits_after(self.facts.global_tag_limits, decision.events)))


def parent_task_state(subflow: FlowRun) -> StateCreate:
    """Prefect's fresh copy of the subflow's state: same type, name, message and data; its id
    and timestamp are the task run's own, minted when written."""
    assert subflow.state is not None
    state = subflow.state
    return StateCreate(type=state.type, name=state.name, message=state.message, data=state.data,
                       state_details=state.state_details.model_copy(update={"child_flow_run_id": subflow.id}))


def with_parent_task_state(decision: Decision, subflow: FlowRun, parent: ParentTask | None, ctx: DecisionContext,
                           *, created: bool = False) -> Decision:
    """`decision` with the subflow's new state forced onto its parent task run (`parent.facts`
    for the forced task rules). A new subflow needs its parent task run, as Prefect's foreign
    key does; a parent deleted since no longer hears of it (Prefect nulls the link)."""
    if parent is None:
        if created:
            raise not_found(f"Task run {subflow.parent_task_run_id} not found.")
        return decision
    cmd = tr.SetTaskRunState(id=parent.run.id, state=parent_task_state(subflow), force=True)
    copied = tr.decide_set_task_run_state(cmd, parent.run, ctx, parent.facts)
    return dataclasses.replace(decision, events=[*decision.events, *copied.events],
                               after={**decision.after, **copied.after}, queue=[*decision.queue, *copied.queue])

"""How the read models count what holds a run back, in SQL: the pool poll
(`scheduled_runs`) and the reason a run waits (`flow_runs.get_flow_run`) share these, so a
reason always names what the poll acts on."""

# The states that hold a queue's and a pool's slot.
ACTIVE = "('PENDING', 'RUNNING')"
# A deployment's limit is the global limit named after it.
DEPLOYMENT_LIMIT = "deployments d JOIN concurrency_limits cl ON cl.name = 'deployment:' || d.id::text"
COLLISION_STRATEGY = "COALESCE(d.concurrency_options ->> 'collision_strategy', 'ENQUEUE')"


def slots_taken(queues: str) -> str:
    """The slots taken in the queues whose id matches `queues` (an SQL condition: `= q.id`,
    `= ANY(:ids)`, `IN (...)`): their PENDING and RUNNING runs, and the runs a release handed a
    slot (commands/slots.hand_over)."""
    return (f"(SELECT count(*) FROM flow_runs a WHERE a.work_queue_id {queues} AND a.state_type IN {ACTIVE})"
            f" + (SELECT count(*) FROM flow_runs h WHERE h.work_queue_id {queues} AND h.pool_slot_reserved)")

"""The runledger Python client: typed async calls over the broker contract.

    from runledger.client import RunledgerClient

    async with RunledgerClient() as rl:
        pool = await rl.create_work_pool("etl", type="process", concurrency_limit=5)
        queue = await rl.create_work_queue("etl", "urgent", priority=1)
        flow = await rl.create_flow("etl", tags=["nightly"])  # by name: a second create returns it
        deployment, created = await rl.create_deployment(flow.id, "nightly", work_pool_name="etl")
        run = await rl.create_flow_run_from_deployment(deployment.id)
        result = await rl.set_flow_run_state(run.id, "PENDING")  # result.status: ACCEPT, REJECT, ...

`RunledgerClient(retries=2, idempotency_keys=True)` sends an `unavailable` request again, a
command with the same idempotency key, so it is applied at most once.
"""

from .envelope import UNSET, Reply, Unset
from .errors import (
    Conflict,
    Forbidden,
    Invalid,
    NotFound,
    ProtocolError,
    RunledgerError,
    Unavailable,
)
from .leases import DeploymentSlotLease, DeploymentSlotLost
from .models import (
    ConcurrencyLimit,
    Deployment,
    DeploymentPage,
    DeploymentSchedule,
    Flow,
    FlowRun,
    FlowRunCreateResult,
    FlowRunSlotSummary,
    HistoryInterval,
    HistoryState,
    LeaseRenewal,
    OrchestrationDetails,
    OrchestrationResult,
    State,
    TagConcurrencyLimit,
    TaskRun,
    Variable,
    Worker,
    WorkerFlowRun,
    WorkPool,
    WorkPoolConcurrencyStatus,
    WorkQueue,
    WorkQueueConcurrencyStatus,
    WorkQueueConcurrencyStatusDetail,
    WorkQueueHealthPolicy,
    WorkQueueStatusDetail,
)
from .runledger_client import RunledgerClient, new_idempotency_key

__all__ = [
    "UNSET",
    "ConcurrencyLimit",
    "Conflict",
    "Deployment",
    "DeploymentPage",
    "DeploymentSchedule",
    "DeploymentSlotLease",
    "DeploymentSlotLost",
    "Flow",
    "FlowRun",
    "FlowRunCreateResult",
    "Forbidden",
    "HistoryInterval",
    "HistoryState",
    "Invalid",
    "LeaseRenewal",
    "NotFound",
    "OrchestrationDetails",
    "OrchestrationResult",
    "ProtocolError",
    "Reply",
    "RunledgerClient",
    "RunledgerError",
    "State",
    "TagConcurrencyLimit",
    "TaskRun",
    "Unavailable",
    "Unset",
    "Variable",
    "Worker",
    "WorkerFlowRun",
    "FlowRunSlotSummary",
    "WorkPool",
    "WorkPoolConcurrencyStatus",
    "WorkQueue",
    "WorkQueueConcurrencyStatus",
    "WorkQueueConcurrencyStatusDetail",
    "WorkQueueHealthPolicy",
    "WorkQueueStatusDetail",
    "new_idempotency_key",
]

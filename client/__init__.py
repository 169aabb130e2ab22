"""The runledger Python client: typed async calls over the broker contract.

    from runledger.client import RunledgerClient

    async with RunledgerClient() as rl:
        pool = await rl.create_work_pool("etl", type="process", concurrency_limit=5)
        queue = await rl.create_work_queue("etl", "urgent", priority=1)
        flow = await rl.create_flow("etl", tags=["nightly"])  # by name: a second create returns it

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
from .models import Flow, WorkPool, WorkQueue
from .runledger_client import RunledgerClient, new_idempotency_key

__all__ = [
    "UNSET",
    "Conflict",
    "Flow",
    "Forbidden",
    "Invalid",
    "NotFound",
    "ProtocolError",
    "Reply",
    "RunledgerClient",
    "RunledgerError",
    "Unavailable",
    "Unset",
    "WorkPool",
    "WorkQueue",
    "new_idempotency_key",
]

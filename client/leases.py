"""Keeping a flow run's deployment concurrency slot while its flow runs.

A deployment with a concurrency limit gives each run that starts one slot, under a lease.
Prefect's engine renews that lease while the flow runs; a process that dies stops renewing
it, and the slot goes back when the lease runs out, so the deployment's other runs are not
held back for ever (Prefect issue #17415). runledger's foreman does the same once a run's
lease has been renewed:

    async with client.hold_deployment_slot(run.id):
        await client.set_flow_run_state(run.id, "RUNNING")
        ...  # the flow's work
        await client.set_flow_run_state(run.id, "COMPLETED")

A run whose lease was never renewed keeps its slot while RUNNING until it ends, as for
Prefect's clients that do not renew (a worker that claimed it and dies has it crashed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from types import TracebackType
from typing import TYPE_CHECKING

from runledger.commands.flow_runs import LEASE_NOT_FOUND

from .errors import NotFound, RunledgerError, Unavailable

if TYPE_CHECKING:
    from .runledger_client import RunledgerClient

log = logging.getLogger(__name__)

# Prefect's engine renews a lease when three quarters of it have passed.
RENEWAL_FRACTION = 0.75
# A renewal that finds the service unavailable is sent again this often until it lands or the
# lease would have run out.
RETRY_SECONDS = 1.0
# How often a block entered before its run took its deployment's slot looks for the lease.
LOOK_FOR_LEASE_SECONDS = 5.0


class DeploymentSlotLost(NotFound):
    """The run's deployment slot's lease ran out (a renewal did not land in time) and the slot
    was given back: another run of the deployment may be running in its place."""


class DeploymentSlotLease:
    """Renews a flow run's deployment slot lease at once and then every three quarters of
    `lease_seconds`, until the block ends: whichever lease the run holds (a run whose lease
    ran out while PENDING takes a new one when it starts). A block entered before the run took
    its slot (still SCHEDULED) looks for the lease every few seconds and keeps it from then
    on, at once when this client moves the run to PENDING or RUNNING; a run without a limited
    deployment leaves nothing to keep (`lease_id` stays None).
    If the lease is lost, `lost` is set and, when `strict` (the default, as Prefect's engine
    does), the block is cancelled and `DeploymentSlotLost` raised from it; otherwise a
    warning is logged and the block runs on."""

    def __init__(self, client: RunledgerClient, flow_run_id: uuid.UUID | str, *, lease_seconds: float = 300.0,
                 strict: bool = True):
        self.client = client
        self.flow_run_id = str(flow_run_id)
        self.lease_seconds = lease_seconds
        self.strict = strict
        self.lease_id: uuid.UUID | None = None
        self.lost = False
        self._owner: asyncio.Task | None = None
        self._renewing: asyncio.Task | None = None
        self._cancelled_owner = False
        self._nudged = asyncio.Event()

    def nudge(self) -> None:
        """The run may have taken its slot just now (this client set its state): look for the
        lease at once rather than at the next look."""
        self._nudged.set()

    async def __aenter__(self) -> DeploymentSlotLease:
        self._owner = asyncio.current_task()
        if await self._renew_once() or await self._limited():
            self.client._slot_holders.setdefault(self.flow_run_id, set()).add(self)
            self._renewing = asyncio.create_task(self._keep(), name=f"deployment-slot-lease-{self.flow_run_id}")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._renewing is not None:
            holders = self.client._slot_holders.get(self.flow_run_id, set())
            holders.discard(self)
            if not holders:
                self.client._slot_holders.pop(self.flow_run_id, None)
            self._renewing.cancel()
            await asyncio.wait([self._renewing])  # a cancel of this task meanwhile is not swallowed
        if self._cancelled_owner and self._owner is not None and exc_type is asyncio.CancelledError:
            self._owner.uncancel()
            raise DeploymentSlotLost(f"Flow run {self.flow_run_id}: its deployment slot's lease {self.lease_id} "
                                     "ran out and the slot was given back") from None

    async def _renew_once(self) -> bool:
        """Renew whichever lease the run holds: False when it holds none (`not_found`)."""
        try:
            renewal = await self.client.renew_deployment_slot_lease(self.flow_run_id, lease_seconds=self.lease_seconds)
        except NotFound as e:
            if e.message != LEASE_NOT_FOUND:
                raise  # no such run
            return False
        self.lease_id = renewal.lease_id
        return True

    async def _limited(self) -> bool:
        """Whether the run may still take a deployment slot to keep: its deployment has a
        concurrency limit and the run has not started yet."""
        run = await self.client.read_flow_run(self.flow_run_id)
        if run.deployment_id is None or run.state_type not in (None, "SCHEDULED"):
            return False
        deployment = await self.client.read_deployment(run.deployment_id)
        return deployment.global_concurrency_limit is not None  # its `concurrency_limit` is always null

    async def _keep(self) -> None:
        loop = asyncio.get_running_loop()
        while self.lease_id is None:  # entered before the run took its slot
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(LOOK_FOR_LEASE_SECONDS, self.lease_seconds * RENEWAL_FRACTION)):
                    await self._nudged.wait()
            self._nudged.clear()
            with contextlib.suppress(Unavailable):
                await self._renew_once()
        runs_out = loop.time() + self.lease_seconds
        warned = False
        while True:
            await asyncio.sleep(self.lease_seconds * RENEWAL_FRACTION)
            while True:
                try:
                    if not await self._renew_once():
                        self._lose()
                        return
                    runs_out = loop.time() + self.lease_seconds
                    warned = False
                    break
                except Unavailable as e:
                    if not warned and loop.time() + RETRY_SECONDS >= runs_out:
                        log.warning("flow run %s: cannot renew its deployment slot's lease (%s)", self.flow_run_id, e)
                        warned = True
                    await asyncio.sleep(RETRY_SECONDS)
                except RunledgerError as e:  # refused: not a thing a retry mends
                    log.error("flow run %s: renewing its deployment slot's lease was refused (%s); no longer "
                              "renewing it", self.flow_run_id, e)
                    return

    def _lose(self) -> None:
        self.lost = True
        if self.strict and self._owner is not None:
            log.error("flow run %s lost its deployment slot (lease %s ran out): stopping it",
                      self.flow_run_id, self.lease_id)
            self._cancelled_owner = True
            self._owner.cancel()
        else:
            log.warning("flow run %s lost its deployment slot (lease %s ran out); it runs on without it",
                        self.flow_run_id, self.lease_id)

"""`runledger flow-run ...`: list and inspect flow runs, propose states, cancel and delete runs,
through the client only. A run is named by its id, or by its name when exactly one run has it.

Exit codes: see `output.py` (3 not found, 4 conflict: a name that several runs have, 5 invalid,
6 unavailable, 2 usage, 1 other), and for `set-state` and `cancel`:

    0  ACCEPT: the state proposed was written
    8  the orchestration did not accept it: REJECT (another state was written instead, e.g.
       AwaitingRetry), WAIT (nothing written; propose again after the delay given) or ABORT
       (nothing written). The status and the reason are printed, on stdout, as the result.

`cancel` exits 0 whenever the run ends up CANCELLING or CANCELLED: a run that had not started
is cancelled at once (the orchestration answers REJECT and writes Cancelled instead), which is
what the user asked for.

Each CLI run is a new client, so the reads here first wait until the read models hold every
write the service had acknowledged (`RunledgerClient.catch_up`)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

import typer
from rich.text import Text

from runledger.client import (
    Conflict,
    FlowRun,
    NotFound,
    OrchestrationResult,
    RunledgerClient,
    State,
)
from runledger.commands.queries import DEFAULT_LIMIT

from .deployments import as_uuid, flow_names, state_label, state_words, when
from .main import app
from .output import (
    JsonFlag,
    KeyOption,
    OutputOption,
    command_line,
    emit_done,
    err_console,
    print_json,
    run,
    run_command,
    say,
    say_if_more,
    show_details,
    show_rows,
    success,
    to_json,
    visible,
    wants_json,
)

flow_run_app = typer.Typer(name="flow-run", help="Inspect flow runs and move them through states.",
                           no_args_is_help=True)
app.add_typer(flow_run_app, name="flow-run")

# The orchestration did not accept the proposed state (REJECT, WAIT or ABORT).
EXIT_NOT_ACCEPTED = 8

STATE_TYPES = ("SCHEDULED", "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "CRASHED", "PAUSED",
               "CANCELLING")
# The state names Prefect's `flow-run ls --state` knows, in any case, as they are spelled; any
# other name is matched as given.
STATE_NAMES = {name.upper(): name for name in (
    "Scheduled", "Pending", "Running", "Completed", "Failed", "Cancelled", "Crashed", "Paused", "Cancelling",
    "Suspended", "AwaitingRetry", "Retrying", "Late", "AwaitingConcurrencySlot", "Resuming", "Cached",
    "RolledBack")}
CANCELLED_TYPES = ("CANCELLING", "CANCELLED")
RUN_COLUMNS = ("Name", "Flow", "State", "Expected Start", "ID")
STATE_COLUMNS = ("Type", "Name", "Timestamp", "Message")
RUN_HELP = "The run's id, or its name when exactly one run has it."
DEFAULT_LS_LIMIT = 100


def state_type(text: str, hint: str = "TYPE") -> str:
    """A state type in any case (`running`), as the service spells it; else a usage error."""
    upper = text.upper()
    if upper not in STATE_TYPES:
        raise typer.BadParameter(f"{text!r} is not one of {', '.join(STATE_TYPES)}", param_hint=hint)
    return upper


def state_name(text: str) -> str:
    """A state name as Prefect's CLI reads it: a known one in any case (`late` is `Late`),
    any other as given (a state's name is free text)."""
    return STATE_NAMES.get(text.upper(), text)


async def resolve_run(rl: RunledgerClient, name: str) -> FlowRun:
    """The run NAME names: an id, or the name of exactly one run."""
    await rl.catch_up()
    run_id = as_uuid(name)
    if run_id is not None:
        try:
            return await rl.read_flow_run(run_id)
        except NotFound as e:
            raise NotFound(f"Flow run {name!r} not found.", field=e.field, details=e.details) from None
    found = await rl.list_flow_runs(names=[name], limit=2)
    if not found:
        raise NotFound(f"Flow run {name!r} not found.")
    if len(found) > 1:
        raise Conflict(f"Several flow runs are named {name!r}; give the id of one "
                       f"(`runledger flow-run ls` shows them).")
    return found[0]


def _check(name: str) -> str:
    return command_line("runledger", "flow-run", "inspect", name)


def show_flow_runs(runs: Iterable[FlowRun], flows: dict[uuid.UUID, str]) -> None:
    rows = [(visible(r.name), visible(flows.get(r.flow_id, r.flow_id)), visible(state_label(r)),
             when(r.expected_start_time), str(r.id)) for r in runs]
    show_rows("Flow Runs", RUN_COLUMNS, rows, "No flow runs found.")


def show_states(states: Iterable[State]) -> None:
    rows = [(visible(s.type), visible(s.name), s.timestamp.isoformat(timespec="milliseconds"),
             visible(s.message) if s.message else "-") for s in states]
    show_rows("State History", STATE_COLUMNS, rows, "No states.")


# ---------------------------------------------------------------------------------------------
# ls, inspect


async def _filters(rl: RunledgerClient, flows: list[str] | None, deployments: list[str] | None,
                   unknown: list[str]) -> dict[str, Any] | None:
    """The ids of the flows and deployments named; None when a filter given matches nothing.
    `unknown` gets each name that names nothing (a typo would otherwise read as "no runs")."""
    out: dict[str, Any] = {}
    if flows:
        found = await rl.list_flows(names=flows, limit=min(len(flows), DEFAULT_LIMIT))
        unknown += [f"no flow is named {n!r}" for n in dict.fromkeys(flows) if n not in {f.name for f in found}]
        if not found:
            return None
        out["flow_ids"] = [f.id for f in found]
    if deployments:
        ids: list[uuid.UUID] = []
        for name in deployments:
            deployment_id = as_uuid(name)
            if deployment_id is not None:
                ids.append(deployment_id)
                continue
            flow_name, sep, deployment_name = name.partition("/")
            if not sep:
                raise typer.BadParameter(f"{name!r} is neither <flow>/<deployment> nor an id",
                                         param_hint="--deployment")
            named = [d.id for d in await rl.list_deployments(flow_names=[flow_name], names=[deployment_name])]
            if not named:
                unknown.append(f"no deployment is named {name!r}")
            ids += named
        if not ids:
            return None
        out["deployment_ids"] = ids
    return out


async def _runs(rl: RunledgerClient, flows: list[str] | None, deployments: list[str] | None,
                names: list[str] | None, types: list[str] | None, limit: int,
                unknown: list[str] | None = None) -> list[FlowRun]:
    await rl.catch_up()
    filters = await _filters(rl, flows, deployments, unknown if unknown is not None else [])
    if filters is None:
        return []
    runs: list[FlowRun] = []
    while len(runs) < limit:
        want = min(DEFAULT_LIMIT, limit - len(runs))
        page = await rl.list_flow_runs(**filters, state_names=names, state_types=types, sort="EXPECTED_START_TIME_DESC",
                                       limit=want, offset=len(runs))
        runs.extend(page)
        if len(page) < want:
            break
    return runs


@flow_run_app.command("ls")
def list_flow_runs(
    flows: list[str] | None = typer.Option(None, "--flow", "-f", help="Only this flow's runs (repeat for more)."),
    deployments: list[str] | None = typer.Option(None, "--deployment", "-d",
                                                 help="Only this deployment's runs: <flow>/<deployment> or an id "
                                                      "(repeat for more)."),
    states: list[str] | None = typer.Option(None, "--state", "-s",
                                            help="Only runs whose state has this NAME, e.g. Late or AwaitingRetry "
                                                 "(any case; repeat for more). For a state type, --state-type."),
    state_types: list[str] | None = typer.Option(None, "--state-type",
                                                 help=f"Only runs whose state is of this TYPE: "
                                                      f"{', '.join(STATE_TYPES)} (any case; repeat for more)."),
    limit: int = typer.Option(DEFAULT_LS_LIMIT, "--limit", "-l", min=1,
                              help=f"Most runs to list (default {DEFAULT_LS_LIMIT})."),
    as_json: JsonFlag = False,
    output: OutputOption = None,
) -> None:
    """List flow runs, latest expected start first.

    --state matches a state's name (a SCHEDULED run that is late is named Late), --state-type
    its type; given both, a run must match both."""
    names = [state_name(s) for s in states] if states else None
    types = [state_type(s, "--state-type") for s in state_types] if state_types else None

    unknown: list[str] = []  # filters that name nothing

    async def action(rl: RunledgerClient) -> tuple[list[FlowRun], dict[uuid.UUID, str]]:
        found = await _runs(rl, flows or None, deployments or None, names, types, limit + 1,  # one more: are there more?
                            unknown)
        return found, ({} if wants_json(as_json, output) else await flow_names(rl, (r.flow_id for r in found[:limit])))

    runs, names = run(action)
    more, runs = len(runs) > limit, runs[:limit]
    if wants_json(as_json, output):
        print_json(runs)
    else:
        show_flow_runs(runs, names)
        say_if_more(len(runs), more, "flow runs")
        for note in unknown:  # a typo in a filter is not "no runs"
            err_console.print(Text(f"note: {note}"))


@flow_run_app.command()
def inspect(
    name: str = typer.Argument(..., metavar="RUN", help=RUN_HELP),
    as_json: JsonFlag = False,
    output: OutputOption = None,
) -> None:
    """Show one flow run: its fields, why it waits, and its state history.

    With --json: the run, with its history as `state_history`."""

    async def action(rl: RunledgerClient) -> tuple[FlowRun, list[State]]:
        found = await resolve_run(rl, name)
        if as_uuid(name) is None and found.state_type == "SCHEDULED":
            # A list carries the reason a refused claim recorded, maybe since overtaken; one run's
            # read says what holds it back now.
            found = await rl.read_flow_run(found.id)
        return found, await rl.read_flow_run_states(found.id)

    flow_run, states = run(action)
    if wants_json(as_json, output):
        print_json({**to_json(flow_run), "state_history": to_json(states)})
        return
    show_details(flow_run, f"Flow run {flow_run.name!r}")
    if flow_run.waiting_reason:
        say(f"Waiting: {flow_run.waiting_reason}")
    if flow_run.deployment_lease_expired and flow_run.state_type == "PENDING":
        say("Deployment slot: its lease expired while the run was PENDING and the slot was given back; "
            "it takes one again when it starts, or is cancelled if none is free.")
    elif flow_run.deployment_lease_expired:
        say("Deployment slot: its lease ran out (its process stopped renewing it) and the slot was given back; "
            "the run holds none.")
    elif flow_run.deployment_lease_expiration is not None:
        say(f"Deployment slot: held under a renewed lease until {flow_run.deployment_lease_expiration.isoformat()}, "
            "given back then unless renewed again.")
    if flow_run.state is not None and flow_run.state.type == "SCHEDULED" and (
            flow_run.pool_slot_reserved or flow_run.state.state_details.get("deployment_concurrency_lease_id")):
        say("Slots: a release handed this run the slots it freed; they are held for it until a worker claims it, "
            "for the service's handed_slot_seconds at most (30 s by default).")
    show_states(states)


# ---------------------------------------------------------------------------------------------
# set-state, cancel, delete


def report_orchestration(noun: str, name: str, result: OrchestrationResult, as_json: bool) -> None:
    """The outcome of a proposed state for the `noun` (flow run, task run) named `name`, as
    JSON or a line or two; exit 8 unless it was accepted."""
    if as_json:
        print_json(result)
    else:
        now = "-" if result.state is None else state_words(result.state.type, result.state.name)
        line = f"{result.status}: {noun} {name!r} is {now}."
        if result.status == "WAIT" and result.details.delay_seconds is not None:
            line += f" Propose it again in {result.details.delay_seconds:g} s."
        if result.accepted:
            success(line)
        else:
            say(line)
        if result.details.reason:
            say(f"Reason: {result.details.reason}")
    if not result.accepted:
        raise typer.Exit(EXIT_NOT_ACCEPTED)


def _propose(name: str, proposed: dict[str, Any], force: bool, key: str | None) -> OrchestrationResult:
    async def action(rl: RunledgerClient, k: str) -> OrchestrationResult:
        found = await resolve_run(rl, name)
        return await rl.set_flow_run_state(found.id, proposed, force=force, idempotency_key=k)

    return run_command(action, key, _check(name))


@flow_run_app.command("set-state")
def set_state(
    name: str = typer.Argument(..., metavar="RUN", help=RUN_HELP),
    type: str = typer.Argument(..., metavar="TYPE", help=f"The state's type: {', '.join(STATE_TYPES)} (any case)."),
    state_name: str | None = typer.Option(None, "--name", "-n", help="The state's name (default: from its type)."),
    message: str | None = typer.Option(None, "--message", "-m", help="A message kept with the state."),
    force: bool = typer.Option(False, "--force", help="Write the state even if the orchestration rules refuse it."),
    as_json: JsonFlag = False,
    output: OutputOption = None,
    idempotency_key: KeyOption = None,
) -> None:
    """Propose a state for a flow run; prints what the orchestration decided.

    Exit 0 when it accepted the state, 8 when it rejected it, asked to wait or aborted."""
    proposed: dict[str, Any] = {"type": state_type(type)}
    if state_name is not None:
        proposed["name"] = state_name
    if message is not None:
        proposed["message"] = message
    report_orchestration("flow run", name, _propose(name, proposed, force, idempotency_key), wants_json(as_json, output))


@flow_run_app.command()
def cancel(
    name: str = typer.Argument(..., metavar="RUN", help=RUN_HELP),
    as_json: JsonFlag = False,
    output: OutputOption = None,
    idempotency_key: KeyOption = None,
) -> None:
    """Cancel a flow run: propose CANCELLING. A run that has not started (SCHEDULED) has nothing to
    tear down and is CANCELLED at once.

    Exit 0 when the run is now CANCELLING or CANCELLED, 8 when the cancellation was refused
    (e.g. the run has ended already)."""
    result = _propose(name, {"type": "CANCELLING"}, False, idempotency_key)
    now = result.state.type if result.state is not None else None
    if result.accepted or now not in CANCELLED_TYPES:
        report_orchestration("flow run", name, result, wants_json(as_json, output))
        return
    # Not accepted as proposed, yet cancelled: Cancelled was written instead (REJECT), or the
    # run was cancelled already (nothing written).
    if wants_json(as_json, output):
        print_json(result)
        return
    assert result.state is not None
    words = state_words(result.state.type, result.state.name)
    written = result.status == "REJECT" and result.state.type == "CANCELLED"
    success(f"Cancelled: flow run {name!r} is now {words}." if written else f"Flow run {name!r} is {words} already.")
    if result.details.reason:
        say(f"Reason: {result.details.reason}")


@flow_run_app.command()
def delete(
    name: str = typer.Argument(..., metavar="RUN", help=RUN_HELP),
    as_json: JsonFlag = False,
    output: OutputOption = None,
    idempotency_key: KeyOption = None,
) -> None:
    """Delete a flow run, whatever its state; its idempotency key is free again at once, and the
    slots it held are given back."""

    async def action(rl: RunledgerClient, key: str) -> None:
        found = await resolve_run(rl, name)
        await rl.delete_flow_run(found.id, idempotency_key=key)

    run_command(action, idempotency_key, _check(name))
    emit_done(wants_json(as_json, output), f"Deleted flow run {name!r}.")

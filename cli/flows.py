"""`runledger flow ...`: create, list, inspect and delete flows, through the client only. Exit
codes: see `output.py` (3 not found, 4 conflict, 5 invalid or forbidden, 6 unavailable, 2 usage,
1 other).

A flow is created by name, and creating a name that exists is not an error: the existing flow
is shown, unchanged (the tags given are not applied), and the message says so. `inspect` takes
a name or an id (a NAME that is a UUID is an id); `delete` takes the id."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import typer

from runledger.client import UNSET, Flow, RunledgerClient
from runledger.commands.queries import DEFAULT_LIMIT

from .main import app
from .output import (
    JsonFlag,
    KeyOption,
    OutputOption,
    command_line,
    emit_done,
    print_json,
    run,
    run_command,
    say,
    show_details,
    show_rows,
    success,
    visible,
    wants_json,
)

flow_app = typer.Typer(name="flow", help="Manage flows.", no_args_is_help=True)
app.add_typer(flow_app, name="flow")

FLOW_COLUMNS = ("Name", "Tags", "Created", "ID")


def _as_uuid(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


def _title(flow: Flow) -> str:
    return f"Flow {flow.name!r}"


def show_flows(flows: Iterable[Flow]) -> None:
    rows = [(visible(f.name), visible(",".join(f.tags)) if f.tags else "-",
             f.created.isoformat(timespec="seconds"), str(f.id)) for f in flows]
    show_rows("Flows", FLOW_COLUMNS, rows, "No flows found.")


@flow_app.command()
def create(
    name: str = typer.Argument(..., help="The flow's name, unique on the server."),
    tags: list[str] | None = typer.Option(None, "--tag", "-t", help="A tag (repeat for more)."),
    as_json: JsonFlag = False,
    output: OutputOption = None,
    idempotency_key: KeyOption = None,
) -> None:
    """Create a flow; if one with this name exists, show it (unchanged)."""
    flow, created = run_command(
        lambda rl, k: rl.ensure_flow(name, tags=UNSET if tags is None else tags, idempotency_key=k),
        idempotency_key, command_line("runledger", "flow", "inspect", name))
    if wants_json(as_json, output):
        print_json(flow)
        return
    if created:
        success(f"Created flow {name!r}.")
    else:
        say(f"Flow {name!r} already exists; unchanged.")
    show_details(flow, _title(flow))


async def _flows(rl: RunledgerClient, names: list[str] | None, tags: list[str] | None,
                 limit: int | None) -> list[Flow]:
    """Every matching flow (at most `limit`), page by page (a page holds at most DEFAULT_LIMIT)."""
    flows: list[Flow] = []
    while limit is None or len(flows) < limit:
        want = DEFAULT_LIMIT if limit is None else min(DEFAULT_LIMIT, limit - len(flows))
        page = await rl.list_flows(names=names, tags=tags, limit=want, offset=len(flows))
        flows.extend(page)
        if len(page) < want:
            break
    return flows


@flow_app.command("ls")
def list_flows(
    names: list[str] | None = typer.Option(None, "--name", "-n", help="Only this flow (repeat for more)."),
    tags: list[str] | None = typer.Option(None, "--tag", "-t", help="Only flows with this tag (repeat: all of them)."),
    limit: int | None = typer.Option(None, "--limit", "-l", min=0, help="Most flows to list (default: all)."),
    as_json: JsonFlag = False,
    output: OutputOption = None,
) -> None:
    """List flows, by name."""
    flows = run(lambda rl: _flows(rl, names or None, tags or None, limit))
    if wants_json(as_json, output):
        print_json(flows)
    else:
        show_flows(flows)


@flow_app.command()
def inspect(
    name: str = typer.Argument(..., help="The flow's name, or its id."),
    as_json: JsonFlag = False,
    output: OutputOption = None,
) -> None:
    """Show one flow, by name or by id."""
    flow_id = _as_uuid(name)
    if flow_id is not None:
        flow = run(lambda rl: rl.read_flow(flow_id))
    else:
        flow = run(lambda rl: rl.read_flow_by_name(name))
    if wants_json(as_json, output):
        print_json(flow)
    else:
        show_details(flow, _title(flow))


@flow_app.command()
def delete(
    flow_id: str = typer.Argument(..., metavar="ID", help="The flow's id (`runledger flow inspect NAME` shows it)."),
    as_json: JsonFlag = False,
    output: OutputOption = None,
    idempotency_key: KeyOption = None,
) -> None:
    """Delete a flow; its name is free again at once."""
    run_command(lambda rl, k: rl.delete_flow(flow_id, idempotency_key=k), idempotency_key,
                command_line("runledger", "flow", "inspect", flow_id))
    emit_done(wants_json(as_json, output), f"Deleted flow {flow_id}.")

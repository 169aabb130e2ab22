"""The `runledger` command: the composition root. Sub-apps register themselves here."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="runledger",
    help="runledger: an event-sourced orchestration core on NATS JetStream and Postgres.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    # Each module adds its own commands to `app`; importing here keeps start-up explicit.
    # asyncapi; broker-config; concurrency-limit ...; deployment ...; flow ...; flow-run ...; replay, verify,
    # events; up, serve; status; task-run ...; task-worker; variable ...; worker ...; work-pool ...; work-queue ...
    from . import (  # noqa: F401
        broker_config,
        concurrency_limits,
        contract,
        deployments,
        flow_runs,
        flows,
        replay,
        service,
        status,
        task_runs,
        task_worker,
        variables,
        work_pools,
        work_queues,
        workers,
    )


def main() -> None:
    from runledger.infra.settings import SettingsError

    _register()
    try:
        app()
    except SettingsError as e:  # from any command: one line, exit code 5 (invalid)
        from rich.console import Console
        from rich.markup import escape

        Console(stderr=True, soft_wrap=True).print(f"[red]Error (invalid settings):[/red] {escape(str(e))}", highlight=False)
        raise SystemExit(5) from None


if __name__ == "__main__":
    # Run as `python -m runledger.cli.main`, this file is `__main__`, not the module the
    # sub-commands register on: hand over to that one.
    from runledger.cli.main import main as registered_main

    registered_main()

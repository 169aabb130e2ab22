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
    # asyncapi; broker-config, broker-setup; concurrency-limit ...; deployment ...; flow ...; flow-run ...; replay, verify,
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
    import nats.errors

    from runledger.infra.settings import SettingsError

    _register()
    try:
        app()
    except SettingsError as e:  # from any command: one line, exit code 5 (invalid)
        _error_line(f"[red]Error (invalid settings):[/red] {_escape(str(e))}")
        raise SystemExit(5) from None
    except nats.errors.TimeoutError as e:  # a request nobody answered: one line, exit code 6 (unavailable)
        _error_line(f"[red]Error (unavailable):[/red] {_escape(_timeout_message(e))}")
        raise SystemExit(6) from None


def _timeout_message(e: BaseException) -> str:
    """Why a request may have gone unanswered. A JetStream request of a role in an account of
    its own (the analyst, task workers) under another prefix than its account's is dropped by
    the server: the setting is then the likely cause, not the broker."""
    tb = e.__traceback__
    while tb is not None:
        if str(tb.tb_frame.f_globals.get("__name__", "")).startswith("nats.js"):
            return ("the broker answered no JetStream request in time (nats: timeout), as it does a request the "
                    "user may not make: is RUNLEDGER_JS_API_PREFIX the one of the user's account? ('$JS.READ.API' "
                    "for analyst, '$JS.TASK.API' for task_worker and task_worker_<name>, '$JS.API' for service)")
        tb = tb.tb_next
    return "the broker answered no request in time (nats: timeout)"


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _error_line(markup: str) -> None:
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(markup, highlight=False)


if __name__ == "__main__":
    # Run as `python -m runledger.cli.main`, this file is `__main__`, not the module the
    # sub-commands register on: hand over to that one.
    from runledger.cli.main import main as registered_main

    registered_main()

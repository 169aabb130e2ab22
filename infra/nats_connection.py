"""Connecting to NATS, refusing servers too old to keep runledger's promises."""

from __future__ import annotations

import asyncio
import contextlib
import ssl

import nats
import nats.errors
from nats.aio.client import Client as NATS

from .settings import MIN_NATS_VERSION, Settings


class BrokerUnavailable(RuntimeError):
    """The broker cannot be reached or cannot serve runledger; the message is safe to print."""


def _version_tuple(version) -> tuple[int, int, int]:
    return (version.major, version.minor, version.patch)


def _fmt(v: tuple[int, int, int]) -> str:
    return ".".join(map(str, v))


async def connect(settings: Settings, *, name: str = "runledger", check_version: bool = True,
                  wait_for_server: bool = True, closed_cb=None, error_cb=None, reconnected_cb=None) -> NATS:
    """A connection that reconnects for ever once made. The first connect waits up to
    `max(5 s, request_timeout)` for a server that is starting (a service beside its broker),
    unless `wait_for_server` is False (the CLI and the client: nothing listening is said at
    once); a refused login always ends it at once."""
    options: dict = {
        "servers": [settings.nats_url],
        "name": name,
        "connect_timeout": 3,
        "max_reconnect_attempts": -1,
        "allow_reconnect": True,
        "inbox_prefix": settings.inbox_prefix,
    }
    if settings.nats_user:
        options["user"] = settings.nats_user
    if settings.nats_password:
        options["password"] = settings.nats_password.get_secret_value()
    if settings.nats_token:
        options["token"] = settings.nats_token.get_secret_value()
    if settings.nats_creds_file:
        options["user_credentials"] = str(settings.nats_creds_file)
    if settings.nats_tls_ca_file or settings.nats_tls_cert_file:
        tls = ssl.create_default_context(cafile=str(settings.nats_tls_ca_file) if settings.nats_tls_ca_file else None)
        if settings.nats_tls_cert_file:
            tls.load_cert_chain(str(settings.nats_tls_cert_file), str(settings.nats_tls_key_file) if settings.nats_tls_key_file else None)
        options["tls"] = tls

    refused: asyncio.Future = asyncio.get_running_loop().create_future()
    last_error: list[str] = []

    async def _on_error(e: Exception) -> None:  # nats-py logs by default; keep it quiet
        last_error[:] = [type(e).__name__]
        if error_cb is not None:  # the caller's own handling (the service answers dropped requests)
            await error_cb(e)
        # nats-py retries a refused login for as long as reconnects are allowed: end the first
        # connect at once instead, with the reason a user can act on.
        if refused.done():
            return
        if "authorization violation" in str(e).lower() or isinstance(e, nats.errors.AuthorizationError):
            refused.set_result("the server refused runledger's credentials (authorization violation)")
        elif isinstance(e, ssl.SSLError):  # retrying cannot mend a certificate
            detail = getattr(e, "verify_message", None) or getattr(e, "reason", None) or type(e).__name__
            refused.set_result(f"the TLS handshake failed ({type(e).__name__}: {detail})")
        elif not wait_for_server and isinstance(e, ConnectionRefusedError):
            refused.set_result("nothing accepts connections there (ConnectionRefusedError)")
        elif not wait_for_server and isinstance(e, OSError):
            refused.set_result(f"the connection failed ({type(e).__name__}; a TLS server that wants a client "
                               "certificate resets connections without one)")

    # Unlimited reconnects keep a running service alive through broker restarts, but nats-py
    # applies them to the first connect too: bound that one ourselves.
    if closed_cb is not None:  # the connection closed for good (or by `close`)
        options["closed_cb"] = closed_cb
    if reconnected_cb is not None:
        options["reconnected_cb"] = reconnected_cb
    connecting = asyncio.ensure_future(nats.connect(**options, error_cb=_on_error))
    limit = max(5.0, settings.request_timeout)
    try:
        await asyncio.wait({connecting, refused}, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        connecting.cancel()
        raise
    if not connecting.done():
        connecting.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await connecting
        reason = refused.result() if refused.done() else (
            f"no connection within {limit:g} s" + (f" (last error: {last_error[0]})" if last_error else ""))
        raise BrokerUnavailable(f"cannot connect to NATS at {settings.safe_nats_url()}: {reason}")
    if connecting.exception() is not None:  # nats raises several unrelated types here
        raise BrokerUnavailable(f"cannot connect to NATS at {settings.safe_nats_url()}: "
                                f"{type(connecting.exception()).__name__}") from None
    nc = connecting.result()
    if check_version:
        found = _version_tuple(nc.connected_server_version)
        if found < MIN_NATS_VERSION:
            await nc.close()
            raise BrokerUnavailable(
                f"NATS server at {settings.safe_nats_url()} is version {_fmt(found)}; runledger needs NATS >= "
                f"{_fmt(MIN_NATS_VERSION)} (atomic batches and aggregate-wide expected-sequence checks)."
            )
    return nc

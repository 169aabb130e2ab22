"""Connecting to NATS, refusing servers too old to keep runledger's promises."""

from __future__ import annotations

import asyncio
import contextlib
import ssl

import nats
import nats.errors
from nats.aio.client import Client as NATS

from .settings import MIN_NATS_VERSION, Settings

_HEADER_LINE = b"NATS/1.0"
_STATUS = "Status"


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """`Name: Value` lines, as nats-py reads them: names ASCII without white space, values
    stripped and decoded as UTF-8 (malformed bytes replaced)."""
    out: dict[str, str] = {}
    for line in raw.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        try:
            key = name.strip().decode("ascii")
        except UnicodeDecodeError:
            continue
        if not key or any(c.isspace() for c in key):
            continue
        out[key] = value.strip().decode("utf-8", "replace")
    return out


class LazyHeaders(dict):
    """A message's headers, read from their bytes on first use. Most messages runledger reads
    carry headers nobody looks at (every event delivered to a projection has its message id,
    its expected-sequence check and its batch's headers); reading them all was up to 8 % of
    the service's CPU. A status line (`NATS/1.0 404 …`) is never here (`LazyClient` reads
    those at once), so asking for the status costs nothing.

    Every Python use reads them first; C code that looks at a dict's storage directly does
    not (`json.dumps` writes `{}`): hand it `dict(headers)`. So only runledger's own
    connections read headers this way (`connect(lazy_headers=True)`: the service's and the
    task worker's), never one a user's code receives messages on."""

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes):
        super().__init__()
        self._raw: bytes | None = raw

    def _read(self) -> None:
        raw, self._raw = self._raw, None
        if raw is not None:
            super().update(parse_header_lines(raw))

    def get(self, key, default=None):
        if key == _STATUS and self._raw is not None:
            return default
        self._read()
        return super().get(key, default)

    def __bool__(self) -> bool:
        if self._raw is not None:
            return b":" in self._raw  # a header line, or nothing nats-py would keep
        return len(self) > 0

    def copy(self) -> dict:
        self._read()
        return dict(self)

    def __or__(self, other):
        self._read()
        return dict(self) | other

    def __ror__(self, other):
        self._read()
        return other | dict(self)

    def clear(self) -> None:
        self._raw = None
        super().clear()

    __hash__ = None

    def __reduce__(self):
        self._read()
        return (dict, (dict(self),))


def _read_first(name: str):
    """`dict.<name>`, after the headers are read."""
    method = getattr(dict, name)

    def read_first(self: LazyHeaders, *args, **kwargs):
        self._read()
        return method(self, *args, **kwargs)

    read_first.__name__ = name
    return read_first


# Every other way to look at or change the headers reads them first.
for _name in ("__getitem__", "__contains__", "__iter__", "__len__", "__eq__", "__ne__", "__repr__", "__reversed__",
              "keys", "values", "items", "pop", "popitem", "setdefault", "update", "__setitem__", "__delitem__"):
    setattr(LazyHeaders, _name, _read_first(_name))


class LazyClient(NATS):
    """nats-py's client, with headers read on first use (`LazyHeaders`); a status line and
    what follows it are read at once, as nats-py reads them."""

    async def _process_headers(self, headers):
        if not headers:
            return None
        raw = bytes(headers[len(_HEADER_LINE):])
        if raw[:1] == b" " or not raw.startswith(b"\r\n"):  # a status line, or not the usual shape
            return await super()._process_headers(headers)
        if b":" not in raw:  # no header line: nats-py answers None
            return None
        return LazyHeaders(raw[2:])


class BrokerUnavailable(RuntimeError):
    """The broker cannot be reached or cannot serve runledger; the message is safe to print."""


def _version_tuple(version) -> tuple[int, int, int]:
    return (version.major, version.minor, version.patch)


def _fmt(v: tuple[int, int, int]) -> str:
    return ".".join(map(str, v))


async def _connected(nc: NATS, options: dict, error_cb) -> NATS:
    await nc.connect(**options, error_cb=error_cb)
    return nc


async def connect(settings: Settings, *, name: str = "runledger", check_version: bool = True,
                  wait_for_server: bool = True, closed_cb=None, error_cb=None, reconnected_cb=None,
                  lazy_headers: bool = False) -> NATS:
    """A connection that reconnects for ever once made. The first connect waits up to
    `max(5 s, request_timeout)` for a server that is starting (a service beside its broker),
    unless `wait_for_server` is False (the CLI and the client: nothing listening is said at
    once); a refused login always ends it at once. `lazy_headers`: read message headers on
    first use (`LazyClient`), for connections only runledger's own code reads from."""
    options: dict = {
        "servers": settings.nats_servers,
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
    # A cluster's node that is down refuses connections while the others take them: with
    # several servers only the bounded wait below gives up.
    one_server = len(options["servers"]) == 1
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
        elif one_server and not wait_for_server and isinstance(e, ConnectionRefusedError):
            refused.set_result("nothing accepts connections there (ConnectionRefusedError)")
        elif one_server and not wait_for_server and isinstance(e, OSError):
            refused.set_result(f"the connection failed ({type(e).__name__}; a TLS server that wants a client "
                               "certificate resets connections without one)")

    # Unlimited reconnects keep a running service alive through broker restarts, but nats-py
    # applies them to the first connect too: bound that one ourselves.
    if closed_cb is not None:  # the connection closed for good (or by `close`)
        options["closed_cb"] = closed_cb
    if reconnected_cb is not None:
        options["reconnected_cb"] = reconnected_cb
    nc = LazyClient() if lazy_headers else NATS()
    connecting = asyncio.ensure_future(_connected(nc, options, _on_error))
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
    if check_version:
        found = _version_tuple(nc.connected_server_version)
        if found < MIN_NATS_VERSION:
            await nc.close()
            raise BrokerUnavailable(
                f"NATS server at {settings.safe_nats_url()} is version {_fmt(found)}; runledger needs NATS >= "
                f"{_fmt(MIN_NATS_VERSION)} (atomic batches and aggregate-wide expected-sequence checks)."
            )
    return nc

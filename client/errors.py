"""Typed errors for the reply codes of the broker contract, so callers can `except NotFound`
instead of comparing strings. Every error keeps what the service said: code, message, and where
given the offending field and details."""

from __future__ import annotations

from typing import Any

from runledger.commands.messages import ErrorCode


class RunledgerError(Exception):
    """Base of every error the client raises; `code` is the contract's error code."""

    code: str = "error"

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None,
                 details: Any = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.field = field
        self.details = details

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, field={self.field!r})"


class NotFound(RunledgerError):
    code = ErrorCode.NOT_FOUND.value


class Conflict(RunledgerError):
    code = ErrorCode.CONFLICT.value


class Invalid(RunledgerError):
    code = ErrorCode.INVALID.value


class Forbidden(Invalid):
    """A sub-kind of `invalid` (Prefect's 403), so `except Invalid` catches it too."""

    code = ErrorCode.FORBIDDEN.value


class Unavailable(RunledgerError):
    """The service cannot answer now: no broker, no responder, a timeout, or it said so.

    `outcome_unknown` is true when a command may have been applied all the same (no reply in
    time, a dropped connection, or the service's own `unavailable`, which it sends when an
    append's outcome is unknown); false when it certainly was not (no broker, nobody listening)
    and for queries. `attempts` is how many times the request was sent."""

    code = ErrorCode.UNAVAILABLE.value

    def __init__(self, message: str, *, outcome_unknown: bool = False, attempts: int = 1, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.outcome_unknown = outcome_unknown
        self.attempts = attempts


class ProtocolError(RunledgerError):
    """The reply is not a runledger envelope: a bug or a version mismatch, not worth a retry."""

    code = "protocol"


ERRORS_BY_CODE: dict[str, type[RunledgerError]] = {
    cls.code: cls for cls in (NotFound, Conflict, Invalid, Forbidden, Unavailable)
}


def error_from_reply(error: Any) -> RunledgerError:
    """The typed error for an envelope's `error` object; an unknown code keeps the base class
    (with that code) so a newer service never turns into a crash here."""
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return ProtocolError(f"malformed error in reply: {error!r}")
    code = str(error.get("code") or "error")
    cls = ERRORS_BY_CODE.get(code, RunledgerError)
    return cls(error["message"], code=code, field=error.get("field"), details=error.get("details"))

"""Name rules shared by every aggregate (BEHAVIOUR C-1) and the subject-token encoding.

NATS subject tokens may not contain `.`, `*`, `>` or whitespace, but names and task keys can.
`encode_token` is the one documented, reversible mapping from any string to a token: the
characters `A-Z a-z 0-9 _ -` stand for themselves, every other UTF-8 byte becomes `~XX`
(upper-case hex), and the empty string becomes `~`. SDKs use the same function.
"""

from __future__ import annotations

import string

from .bounds import check_name_characters

BANNED_NAME_CHARACTERS = "/%&><"
MAX_NAME_LENGTH = 255
_SAFE = frozenset(string.ascii_letters + string.digits + "_-")


def encode_token(value: str) -> str:
    if value == "":
        return "~"
    out: list[str] = []
    for ch in value:
        if ch in _SAFE:
            out.append(ch)
        else:
            out.extend(f"~{b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)


def decode_token(token: str) -> str:
    if token == "~":
        return ""
    raw = bytearray()
    i = 0
    while i < len(token):
        ch = token[i]
        if ch == "~":
            hex_part = token[i + 1 : i + 3]
            if len(hex_part) != 2:
                raise ValueError(f"malformed subject token: {token!r}")
            raw.append(int(hex_part, 16))
            i += 3
        elif ch in _SAFE:
            raw.extend(ch.encode("ascii"))
            i += 1
        else:
            raise ValueError(f"malformed subject token: {token!r}")
    return raw.decode("utf-8")


def check_object_name(value: str) -> str:
    """C-1: non-empty and free of `/ % & > <`; and, so that the read model can store it and a
    terminal show it, free of control characters (C0, DEL, C1) and of NUL above all. Used as
    a pydantic after-validator."""
    if not value:
        raise ValueError("name must not be empty")
    bad = [c for c in BANNED_NAME_CHARACTERS if c in value]
    if bad:
        raise ValueError(f"name must not contain any of {' '.join(BANNED_NAME_CHARACTERS)} (found {' '.join(bad)})")
    return check_name_characters(value)


def check_work_pool_name(value: str) -> str:
    """C-1 plus the pool-only rule: nothing may remain but spaces and quotes (`""` included,
    with the same message)."""
    if not value.replace(" ", "").replace("'", "").replace('"', ""):
        raise ValueError("name cannot be an empty string")
    return check_object_name(value)


def is_reserved_work_pool_name(name: str) -> bool:
    """WP-5: names starting with `prefect` (any case) are the system's."""
    return name.lower().startswith("prefect")

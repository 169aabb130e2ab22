"""Task keys as subject tokens: the one reversible encoding of any task key into one NATS
subject token, used by the service, the task workers and the docs. Pure, so that a command
can refuse a key whose subject would be too long before anything is written.

ASCII letters, digits, `_` and `-` stand for themselves; every other character is `~` and
the two hex digits of each of its UTF-8 bytes (`my.task` -> `my~2Etask`, `~` -> `~7E`); the
empty key is `~`.
"""

from __future__ import annotations

import re

_KEPT = re.compile(r"[A-Za-z0-9_\-]")
_ESCAPE = "~"
# The longest encoded key: a subject (with its namespace and side around it) must stay well
# inside the server's 4,096-byte protocol line, headers and reply subject included.
MAX_ENCODED_TASK_KEY = 1_024


def encode_task_key(key: str) -> str:
    """One subject token for any task key (see the module docstring)."""
    if not key:
        return _ESCAPE
    return "".join(ch if _KEPT.fullmatch(ch) else "".join(f"~{b:02X}" for b in ch.encode()) for ch in key)


def decode_task_key(token: str) -> str:
    """The task key `encode_task_key` made `token` from."""
    if token == _ESCAPE:
        return ""
    out = bytearray()
    i = 0
    while i < len(token):
        if token[i] == _ESCAPE:
            out.append(int(token[i + 1:i + 3], 16))
            i += 3
        else:
            out += token[i].encode()
            i += 1
    return out.decode()


def check_task_key(key: str) -> str:
    """A task key whose subject fits: at most `MAX_ENCODED_TASK_KEY` characters once encoded
    (a character outside ASCII letters, digits, `_` and `-` takes 3 to 12)."""
    encoded = len(encode_task_key(key))
    if encoded > MAX_ENCODED_TASK_KEY:
        raise ValueError(f"is {encoded} characters once encoded for its subject; at most "
                         f"{MAX_ENCODED_TASK_KEY} (letters, digits, _ and - take 1, others 3 to 12)")
    return key

"""Headers read on first use (infra/nats_connection.LazyClient): every header block reads as
nats-py's own client reads it, and a message without a status line answers `get("Status")`
without reading the rest."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
from nats.aio.client import Client as NATS

from runledger.infra.nats_connection import LazyClient, LazyHeaders

pytestmark = pytest.mark.asyncio

BLOCKS = [
    b"NATS/1.0\r\nNats-Msg-Id: abc\r\nNats-Expected-Last-Subject-Sequence: 12\r\n\r\n",
    b"NATS/1.0\r\nA:no-space\r\nB:\tTab \r\nBad Name: x\r\n\xff\xfe: y\r\nC: \xc3\xa9t\xc3\xa9\r\n\r\n",
    b"NATS/1.0 404 No Messages\r\n\r\n",
    b"NATS/1.0 503\r\n\r\n",
    b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 1016\r\nNats-Last-Stream: 1024\r\n\r\n",
    b"NATS/1.0\r\n\r\n",
    b"",
]


@pytest.mark.parametrize("block", BLOCKS)
async def test_headers_read_as_nats_py_reads_them(block):
    ours = await LazyClient()._process_headers(block)
    theirs = await NATS()._process_headers(block)
    assert (ours is None) == (theirs is None)
    if theirs is not None:
        assert dict(ours) == theirs and ours == theirs and bool(ours) == bool(theirs)
        assert ours.get("Status") == theirs.get("Status")


async def test_a_message_without_a_status_line_is_read_only_when_used():
    headers = await LazyClient()._process_headers(BLOCKS[0])
    assert isinstance(headers, LazyHeaders)
    assert headers.get("Status") is None and headers._raw is not None  # nothing read yet
    assert headers  # there are headers
    assert headers["Nats-Msg-Id"] == "abc" and "Nats-Msg-Id" in headers and len(headers) == 2
    assert sorted(headers) == ["Nats-Expected-Last-Subject-Sequence", "Nats-Msg-Id"]
    assert headers.get("Nats-Expected-Last-Subject-Sequence") == "12"
    assert dict(headers.items()) == {"Nats-Msg-Id": "abc", "Nats-Expected-Last-Subject-Sequence": "12"}
    assert pickle.loads(pickle.dumps(headers)) == dict(headers)
    for fresh in [await LazyClient()._process_headers(BLOCKS[0]) for _ in range(6)]:
        assert fresh != {}  # each comparison, copy or encoding reads them first
    assert json.loads(json.dumps(dict(await LazyClient()._process_headers(BLOCKS[0]))))["Nats-Msg-Id"] == "abc"
    assert {**(await LazyClient()._process_headers(BLOCKS[0]))}["Nats-Msg-Id"] == "abc"
    assert ((await LazyClient()._process_headers(BLOCKS[0])) | {"x": "1"})["Nats-Msg-Id"] == "abc"
    assert copy.copy(await LazyClient()._process_headers(BLOCKS[0]))["Nats-Msg-Id"] == "abc"


async def test_a_status_header_a_sender_wrote_is_not_a_server_status():
    """Only the server's status line (`NATS/1.0 503`) is a status: a `Status` header in a
    message's own headers does not make it look like one to `get`."""
    headers = await LazyClient()._process_headers(b"NATS/1.0\r\nStatus: 503\r\n\r\n")
    assert headers.get("Status") is None

"""The endpoint's pure parts: which reply subjects may be answered, and how a reply too large
for the broker becomes a page or an error."""

from __future__ import annotations

import json

import pytest

from runledger.handlers.endpoint import fit_reply, protected_prefixes, reply_subject_allowed
from runledger.infra.settings import Settings

SETTINGS = Settings(namespace="rl")
PROTECTED = protected_prefixes(SETTINGS)


@pytest.mark.parametrize("reply", ["_INBOX.abc", "_INBOX.client.Zx12.7", "_INBOX.a-b_c.1"])
def test_inboxes_are_answered(reply):
    assert reply_subject_allowed(reply, "_INBOX.", PROTECTED)


@pytest.mark.parametrize("reply", [
    None, "", "rl.evt.work_pool.x.WorkPoolUpdated", "rl.idem.0000", "rl.cmd.CreateWorkPool", "rl.qry.ListWorkPools",
    "$KV.RL_SNAPSHOTS.x", "$JS.API.STREAM.DELETE.RL_EVENTS", "$SYS.REQ.SERVER.PING", "_INBOX.*", "_INBOX.>",
    "_INBOX.a.*", "_INBOX.a.>", "_INBOX..a", "_INBOX.a.", "_INBOX.", "_INBOX.a b", "_INBOX.a\r\nPUB x 1",
    "_INBOX.\x00", "_INBOX.é", "inbox.a", "_inbox.a", "_INBOX.x." + "y" * 300,
])
def test_anything_else_is_not(reply):
    assert not reply_subject_allowed(reply, "_INBOX.", PROTECTED)


def test_a_configured_prefix_still_keeps_out_of_our_streams():
    assert reply_subject_allowed("rl.replies.a1", "rl.", PROTECTED)
    assert not reply_subject_allowed("rl.evt.a1", "rl.", PROTECTED)


def _pools(n: int, size: int) -> list[dict]:
    return [{"name": f"p{i}", "template": "x" * size} for i in range(n)]


def test_a_list_too_large_becomes_the_longest_page_that_fits():
    out = {"ok": True, "result": _pools(5, 1000), "seq": 7, "created": None}
    body = fit_reply(out, b'{"offset": 10}', 2500, "query")
    page = json.loads(body)
    assert len(body) <= 2500
    assert [p["name"] for p in page["result"]] == ["p0", "p1"]
    assert page["truncated"] is True and page["next_offset"] == 12 and page["seq"] == 7


def test_one_item_too_large_alone_is_an_error():
    out = {"ok": True, "result": _pools(2, 5000), "seq": 7, "created": None}
    page = json.loads(fit_reply(out, b"{}", 2500, "query"))
    assert page["ok"] is False and page["error"]["code"] == "invalid"
    assert "offset 0" in page["error"]["message"]


def test_a_single_object_too_large_is_an_error_and_a_command_keeps_its_outcome():
    out = {"ok": True, "result": {"template": "x" * 5000}, "seq": 9, "created": True}
    query = json.loads(fit_reply(out, b"{}", 2500, "query"))
    assert query["ok"] is False and query["error"]["code"] == "invalid" and "2500" in query["error"]["message"]
    command = json.loads(fit_reply(out, b"{}", 2500, "command"))
    assert command == {"ok": True, "result": None, "seq": 9, "created": True, "truncated": True}


def test_a_reply_subject_made_for_a_service_import_is_an_inbox():
    # nats-server's `_R_.` replies: a request that crossed an account import (the analyst's ReadEvents)
    assert reply_subject_allowed("_R_.G9qraP.klUjl0", "_INBOX.", PROTECTED)
    assert not reply_subject_allowed("_R_.*", "_INBOX.", PROTECTED)
    assert not reply_subject_allowed("_R_..x", "_INBOX.", PROTECTED)

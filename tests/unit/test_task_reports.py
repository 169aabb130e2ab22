"""How a task worker's reports are grouped into requests (`handlers/task_reports.py`), without
a broker: the requests it would send are answered here by hand, in the order the test
chooses. That the service decides each item as if alone is tested against the real one
(tests/integration/test_task_reports.py)."""

from __future__ import annotations

import asyncio
import json

import pytest

from runledger.handlers import task_reports
from runledger.handlers.task_reports import REQUESTS_OUT, ReportBatcher

pytestmark = pytest.mark.asyncio


class Requests:
    """The requests made, each waiting until the test answers it."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict, asyncio.Future]] = []
        self.arrived = asyncio.Event()

    async def __call__(self, name: str, body: bytes) -> dict:
        answer: asyncio.Future = asyncio.get_running_loop().create_future()
        self.sent.append((name, json.loads(body), answer))
        self.arrived.set()
        return await answer

    async def wait_for(self, count: int) -> None:
        while len(self.sent) < count:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 1)


def body(n: int) -> dict:
    return {"id": f"run-{n}", "state": {"type": "COMPLETED"}}


def answered(n: int) -> dict:
    return {"ok": True, "result": {"type": "COMPLETED", "name": f"for run-{n}"}}


async def test_a_lone_report_goes_at_once_alone():
    requests = Requests()
    batcher = ReportBatcher(requests)
    report = asyncio.create_task(batcher.report(body(1)))
    await requests.wait_for(1)
    name, sent, answer = requests.sent[0]
    assert (name, sent) == ("SetTaskRunState", body(1))
    answer.set_result(answered(1))
    assert await report == answered(1)


async def test_reports_made_while_requests_are_out_go_together_each_answered_its_own():
    requests = Requests()
    batcher = ReportBatcher(requests)
    first = [asyncio.create_task(batcher.report(body(n))) for n in range(REQUESTS_OUT)]
    await requests.wait_for(REQUESTS_OUT)
    later = [asyncio.create_task(batcher.report(body(n))) for n in range(10, 15)]
    await asyncio.sleep(0.01)
    assert len(requests.sent) == REQUESTS_OUT  # nothing more goes while they are out
    requests.sent[0][2].set_result(answered(0))
    await requests.wait_for(REQUESTS_OUT + 1)
    name, sent, answer = requests.sent[-1]
    assert name == "SetTaskRunStates" and sent == {"states": [body(n) for n in range(10, 15)]}
    answer.set_result({"ok": True, "result": [answered(n) for n in range(10, 15)]})
    assert await asyncio.gather(*later) == [answered(n) for n in range(10, 15)]
    assert batcher.bulks == 1
    for _, _, pending in requests.sent[1:REQUESTS_OUT]:
        pending.set_result(answered(1))
    assert await first[0] == answered(0)


async def reports_7_and_8_sent_together() -> tuple[Requests, ReportBatcher, list[asyncio.Task], list[asyncio.Task]]:
    """Requests out to the limit, two reports (7 and 8) made meanwhile, the first request
    answered: the two have just gone out together, unanswered. The other blockers still wait."""
    requests = Requests()
    batcher = ReportBatcher(requests)
    blockers = [asyncio.create_task(batcher.report(body(n))) for n in range(REQUESTS_OUT)]
    await requests.wait_for(REQUESTS_OUT)
    later = [asyncio.create_task(batcher.report(body(n))) for n in (7, 8)]
    await asyncio.sleep(0)
    requests.sent[0][2].set_result(answered(0))
    await requests.wait_for(REQUESTS_OUT + 1)
    assert requests.sent[-1][:2] == ("SetTaskRunStates", {"states": [body(7), body(8)]})
    return requests, batcher, blockers, later


async def test_a_bulk_refused_whole_is_sent_again_one_report_at_a_time():
    requests, batcher, blockers, later = await reports_7_and_8_sent_together()
    requests.sent[-1][2].set_result({"ok": False, "error": {"code": "invalid", "message": "states.1.state: ..."}})
    await requests.wait_for(REQUESTS_OUT + 3)
    alone = requests.sent[-2:]
    assert [(name, sent) for name, sent, _ in alone] == [("SetTaskRunState", body(7)), ("SetTaskRunState", body(8))]
    alone[0][2].set_result(answered(7))
    alone[1][2].set_result({"ok": False, "error": {"code": "invalid", "message": "its own problem"}})
    assert await later[0] == answered(7)
    assert (await later[1])["error"]["message"] == "its own problem"
    assert batcher.bulks == 0
    for _, _, pending in requests.sent[1:REQUESTS_OUT]:
        pending.set_result(answered(1))
    await asyncio.gather(*blockers)


async def answer_all(requests: Requests, reports: list[asyncio.Task]) -> None:
    """Answers every request, as it comes, until `reports` are answered."""
    while not all(report.done() for report in reports):
        for _, sent, pending in requests.sent:
            if not pending.done():
                pending.set_result({"ok": True, "result": [answered(0)] * len(sent["states"])} if "states" in sent
                                   else answered(0))
        await asyncio.sleep(0)


async def test_reports_sent_together_without_answer_go_again_alone_and_alone_for_a_while(monkeypatch):
    """No answer: the service or the broker away, or a broker whose configuration refuses the
    command (an older one); each report is sent again alone, as after a lost reply."""
    monkeypatch.setattr(task_reports, "ALONE_AFTER_FAILURE_SECONDS", 0.2)
    requests, batcher, blockers, later = await reports_7_and_8_sent_together()
    requests.sent[-1][2].set_exception(TimeoutError())
    await requests.wait_for(REQUESTS_OUT + 3)
    alone = requests.sent[-2:]
    assert [(name, sent) for name, sent, _ in alone] == [("SetTaskRunState", body(7)), ("SetTaskRunState", body(8))]
    alone[0][2].set_result(answered(7))
    alone[1][2].set_exception(TimeoutError())  # this one's caller tries again itself
    assert await later[0] == answered(7)
    with pytest.raises(TimeoutError):
        await later[1]
    # For a while, reports made together go one by one; then together again.
    async def two_waiting_then_answered(first: int) -> list[tuple[str, dict]]:
        """Requests out to the limit, two reports made meanwhile: how those two are sent."""
        for _ in range(3):
            await asyncio.sleep(0)  # requests answered give their room back
        filler = [asyncio.create_task(batcher.report(body(n))) for n in range(100, 100 + REQUESTS_OUT - batcher._out)]
        waiting = [asyncio.create_task(batcher.report(body(n))) for n in (first, first + 1)]
        sent_before = len(requests.sent) + len(filler)
        for _ in range(3):
            await asyncio.sleep(0)
        assert batcher._out == REQUESTS_OUT and len(batcher._waiting) == 2
        await answer_all(requests, [*filler, *waiting, *blockers])
        return [(name, sent) for name, sent, _ in requests.sent[sent_before:] if "states" in sent
                or sent["id"] in (f"run-{first}", f"run-{first + 1}")]

    assert await two_waiting_then_answered(20) == [("SetTaskRunState", body(20)), ("SetTaskRunState", body(21))]
    await asyncio.sleep(0.25)
    blockers = [asyncio.create_task(batcher.report(body(n))) for n in range(REQUESTS_OUT)]
    await requests.wait_for(len(requests.sent) + REQUESTS_OUT)
    assert await two_waiting_then_answered(40) == [("SetTaskRunStates", {"states": [body(40), body(41)]})]


async def test_a_request_carries_no_more_than_its_limits(monkeypatch):
    monkeypatch.setattr(task_reports, "MAX_REPORTS_PER_REQUEST", 3)
    monkeypatch.setattr(task_reports, "MAX_REQUEST_BYTES", 10_000)
    requests = Requests()
    batcher = ReportBatcher(requests)
    blockers = [asyncio.create_task(batcher.report(body(n))) for n in range(REQUESTS_OUT)]
    await requests.wait_for(REQUESTS_OUT)
    big = {"id": "run-big", "state": {"type": "COMPLETED", "message": "x" * 20_000}}
    later = [asyncio.create_task(batcher.report(b)) for b in [body(10), body(11), body(12), body(13), big, body(14)]]
    await asyncio.sleep(0)
    await answer_all(requests, [*blockers, *later])
    after = [sent.get("states", [sent]) for _, sent, _ in requests.sent[REQUESTS_OUT:]]
    # Three at most in one; one too large to share a request goes alone, and so does the one
    # that would not fit beside it.
    assert after == [[body(10), body(11), body(12)], [body(13)], [big], [body(14)]]
    assert [name for name, _, _ in requests.sent[REQUESTS_OUT:]] == [
        "SetTaskRunStates", "SetTaskRunState", "SetTaskRunState", "SetTaskRunState"]

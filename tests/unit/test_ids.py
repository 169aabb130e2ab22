"""Fresh ids for events and objects: RFC 4122 version-4 UUIDs, never repeated, across the
refills of the buffered random source."""

import uuid

from runledger.commands.messages import DecisionContext, _RandomIds


def test_ids_are_random_version_4_uuids_and_never_repeat_across_refills():
    new_id = _RandomIds(ids_per_read=8)
    ids = [new_id() for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    assert all(i.version == 4 and i.variant == uuid.RFC_4122 for i in ids)
    # Every other bit varies: no byte of the buffer is reused or left out.
    assert all(len({str(i)[pos] for i in ids}) > 1 for pos in range(36) if pos not in (8, 13, 14, 18, 23))


def test_a_decision_context_uses_them_and_a_fixed_one_counts():
    assert DecisionContext().new_id().version == 4
    fixed = DecisionContext.fixed(DecisionContext().now)
    assert [fixed.new_id(), fixed.new_id()] == [uuid.UUID(int=1), uuid.UUID(int=2)]

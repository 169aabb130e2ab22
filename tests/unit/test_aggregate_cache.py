"""The aggregate cache keeps each kind within its own bound, least recently used out first, so
a long history of runs cannot push the pools out or fill the service's memory."""

from __future__ import annotations

from runledger.infra.aggregates import AggregateKind, AggregateRepository, Loaded


def _kind(name: str, max_cached: int | None = None) -> AggregateKind:
    return AggregateKind(name, lambda: None, lambda state, event: state, max_cached=max_cached)


def test_each_kind_is_bounded_on_its_own_least_recently_used_first() -> None:
    repo = AggregateRepository(None, [_kind("run", max_cached=3), _kind("pool")], max_cached=100)  # type: ignore[arg-type]
    repo.remember("pool", "p", Loaded("pool state", 1))
    for i in range(5):
        repo.remember("run", f"r{i}", Loaded(i, i + 1))
        if i == 1:
            repo.cached("run", "r0")  # a hit does not make it recent: only loads and writes do
    assert [i for i in range(5) if repo.cached("run", f"r{i}") is not None] == [2, 3, 4]
    assert repo.cached("pool", "p") == Loaded("pool state", 1)  # runs never push a pool out
    assert len(repo) == 4
    repo.forget("run", "r4")
    assert repo.cached("run", "r4") is None and len(repo) == 3


def test_a_kind_that_grows_with_what_it_holds_is_bounded_by_its_weight() -> None:
    """A deployment's index of scheduled runs: many small ones or a few big ones, the cache
    keeps at most so many indexed runs; one alone heavier than the bound stays (it is in use)."""
    index = AggregateKind("index", list, lambda state, event: state, weight=len, max_weight=10)
    repo = AggregateRepository(None, [index, _kind("pool")], max_cached=100)  # type: ignore[arg-type]
    for i in range(4):
        repo.remember("index", f"i{i}", Loaded([0] * 3, i + 1))  # 3 each: the fourth pushes the first out
    assert [i for i in range(4) if repo.cached("index", f"i{i}") is not None] == [1, 2, 3]
    repo.remember("index", "i2", Loaded([0] * 6, 9))  # grown: 3 + 6 + 3 > 10, the oldest goes
    assert [i for i in range(4) if repo.cached("index", f"i{i}") is not None] == [2, 3]
    repo.forget("index", "i3")
    repo.remember("index", "big", Loaded([0] * 50, 10))
    assert repo.cached("index", "big") is not None and repo.cached("index", "i2") is None
    repo.forget("index", "big")
    repo.remember("index", "small", Loaded([0], 11))  # the weight of what left is given back
    assert repo.cached("index", "small") is not None and len(repo) == 1

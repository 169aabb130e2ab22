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

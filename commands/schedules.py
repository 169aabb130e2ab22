"""Deployment schedules: their shapes, their validation and the dates they produce.

Three kinds, with Prefect's field names and defaults:

- `IntervalSchedule` (`interval`, `anchor_date`, `timezone`): the dates `anchor + k * interval`
  for every integer k (negative too: the anchor is a phase, not a first date). `interval`
  is a positive duration, a JSON number of seconds as Prefect writes it. A missing
  `anchor_date` means "when the schedule is created": the decider fills it with
  `with_anchor(schedule, now)`, since this module never reads the clock. `timezone`
  defaults to "UTC", as Prefect infers it from an anchor given as an ISO string.
  Intervals shorter than a day are steps of elapsed time, so an hourly schedule fires
  every UTC hour across a DST change. Intervals of a day or more are steps on the local
  wall clock of `timezone`, so "daily at 09:00 America/New_York" stays at 09:00 local
  time after DST begins or ends; this is what Prefect documents and what its step from
  one date to the next does. (Prefect jumps to the first date after `start` by adding
  whole intervals of elapsed time, which puts such a schedule an hour off whenever the
  anchor and `start` fall on different sides of a DST change; we do not copy that.)
- `CronSchedule` (`cron`, `timezone`, `day_or`): croniter evaluated on the local wall clock
  of `timezone` (UTC when null), each local time then placed in the zone as Prefect does:
  a nonexistent local time (inside a spring-forward gap) moves forward by the gap (02:30
  becomes 03:30), an ambiguous one (in the repeated hour) takes its first occurrence, and a
  date met twice is produced once. Croniter's random (`R`) and hashed (`H`) fields are rejected, as Prefect
  rejects them.
- `RRuleSchedule` (`rrule`, `timezone`): an RFC 5545 rule or rule set as dateutil reads it,
  at most 6,500 characters (Prefect's limit), every `INTERVAL` at least 1 (dateutil takes 0
  and then repeats one date forever; Prefect lets it through). A rule without `DTSTART` starts at
  2020-01-01T00:00 local time, Prefect's default. Every `DTSTART`, `UNTIL`, `RDATE` and
  `EXDATE` is read as a wall-clock time in the schedule's `timezone` ("UTC" by default),
  whatever zone the string names: Prefect relabels them all with the schedule's zone.

`dates_in(schedule, start, end, max_count)` gives the dates `>= start` and `<= end`, in
order, at most `max_count` (and never more than `MAX_DATES`, Prefect's cap on one
evaluation), as timezone-aware UTC datetimes. `dates_to_schedule` adds the scheduler's
stopping rule (stop once there are `min_runs` dates and the last is at least `min_time` after
`start`), as Prefect's scheduler does for each active schedule.

Bounded work. A schedule is user input evaluated inside the service, so no schedule may make
an evaluation slow: an interval jumps straight to the first date at or after `start`; a cron
expression that never matches ends croniter's search with an error, read as "no more dates";
an rrule is re-anchored (its `DTSTART` moved forward by whole periods, which yields the same
occurrences from there on) close to `start`, so an old `DTSTART` does not make dateutil walk
years of occurrences, and dateutil's walk is capped both in occurrences and in calendar months
examined (`_WALK_MONTHS`: a thousand years for a YEARLY rule down to one month for a SECONDLY
one), so a rule whose filters never or almost never match (such as February 30th) returns what
it found instead of searching until year 9999. The slowest input left is a SECONDLY rule whose
day filters exclude most days and whose hour filter is late in the day (dateutil steps through
each excluded day second by second): about a third of a second. Datetimes stay
inside the years 0001..9999 that the read side stores: a date past them ends the list, no
OverflowError escapes.

Run ids and idempotency keys of scheduled runs are derived from (deployment, schedule, date),
so evaluating the same schedule twice cannot write the same run twice.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, available_timezones

# No type information shipped for croniter or dateutil.
from croniter import CroniterError, croniter  # type: ignore[import-untyped]
from dateutil.relativedelta import relativedelta  # type: ignore[import-untyped]
from dateutil.rrule import (  # type: ignore[import-untyped]
    DAILY,
    HOURLY,
    MINUTELY,
    MONTHLY,
    SECONDLY,
    WEEKLY,
    YEARLY,
    rrule,
    rruleset,
    rrulestr,
)
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
)

from .bounds import EARLIEST, LATEST, UtcDatetime, check_storable_text

# Prefect's cap on the dates one evaluation of a schedule yields (its MAX_ITERATIONS).
MAX_DATES = 1000
# Prefect's cap on an rrule string ("about a year of RDATEs").
MAX_RRULE_LENGTH = 6500
# Far beyond any real cron expression; keeps croniter's parser off megabyte strings.
MAX_CRON_LENGTH = 1000
# Where an rrule without DTSTART starts, as Prefect evaluates it (local wall clock).
RRULE_DEFAULT_DTSTART = datetime(2020, 1, 1)

_ONE_DAY = timedelta(days=1)
_ONE_SECOND = timedelta(seconds=1)


@dataclass(frozen=True)
class ScheduleDefaults:
    """The scheduler's defaults (Prefect's settings of the same meaning)."""

    min_runs: int = 3
    max_runs: int = 100
    min_time: timedelta = timedelta(hours=1)  # min_scheduled_time
    max_time: timedelta = timedelta(days=100)  # max_scheduled_time: end = start + max_time
    max_scheduled_runs_limit: int = 50  # upper bound of a schedule's `max_scheduled_runs`


SCHEDULE_DEFAULTS = ScheduleDefaults()


# --- time zones -----------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _known_timezones() -> frozenset[str]:
    # What zoneinfo can load, as Prefect checks it; "localtime" names the host's zone, not one.
    return frozenset(name for name in available_timezones() if "localtime" not in name)


def check_timezone(value: str | None) -> str | None:
    """An IANA zone name zoneinfo knows. Prefect lets "" through (it then means UTC)."""
    if value and value not in _known_timezones():
        raise ValueError(
            f'Invalid timezone: "{check_storable_text(value)[:100]}" '
            "(specify in IANA tzdata format, for example, America/New_York)"
        )
    return value


def _zone(name: str | None) -> ZoneInfo:
    return ZoneInfo(name or "UTC")


def _local_naive(instant: datetime, zone: ZoneInfo) -> datetime | None:
    """The wall-clock time of a UTC instant in `zone`, without tzinfo (None past year 9999)."""
    try:
        return instant.astimezone(zone).replace(tzinfo=None)
    except OverflowError:
        return None


def _placed(local: datetime, zone: ZoneInfo) -> datetime | None:
    """A wall-clock time placed in `zone` (fold 0: the first of a repeated hour, just after a
    skipped one) as UTC; None outside the storable range."""
    try:
        instant = local.replace(tzinfo=zone).astimezone(UTC)
    except (OverflowError, ValueError):
        return None
    return instant if EARLIEST <= instant <= LATEST else None


def _shifted(value: datetime, delta: timedelta) -> datetime | None:
    try:
        return value + delta
    except OverflowError:
        return None


def _as_utc(value: datetime) -> datetime:
    """Aware UTC (naive read as UTC), clamped to the storable range."""
    utc = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return min(max(utc, EARLIEST), LATEST)


# --- the schedule models --------------------------------------------------------------------


def _seconds(value: Any) -> Any:
    """Prefect sends an interval as a number of seconds: accepted even where parsing is strict
    (the service parses commands strictly, where a number is not a duration)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value) or abs(value) > _MAX_INTERVAL_SECONDS:
            raise ValueError(f"interval must be a finite number of seconds, at most {_MAX_INTERVAL_SECONDS}")
        return timedelta(seconds=value)
    return value


# timedelta's own bound (999,999,999 days), in seconds.
_MAX_INTERVAL_SECONDS = 86_399_999_999_999


class IntervalSchedule(BaseModel):
    """Every `interval` from `anchor_date` (see the module docstring for time zones)."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_timedelta="float")

    interval: Annotated[timedelta, BeforeValidator(_seconds)]  # seconds in JSON, as Prefect sends them
    anchor_date: UtcDatetime | None = None
    timezone: Annotated[str | None, Field(validate_default=True)] = None

    @field_validator("interval")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("interval must be positive")
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str | None) -> str:
        # Prefect infers the zone from the anchor; an anchor read from JSON carries an
        # offset, not a zone name, so the inferred zone is UTC.
        if value is None:
            return "UTC"
        check_timezone(value)
        return value


class CronSchedule(BaseModel):
    """A cron expression on the wall clock of `timezone` (UTC when null)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cron: str
    timezone: str | None = None
    day_or: bool = True

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        check_storable_text(value)
        if len(value) > MAX_CRON_LENGTH:
            raise ValueError(f"Invalid cron string: longer than {MAX_CRON_LENGTH} characters")
        if not croniter.is_valid(value):
            raise ValueError(f'Invalid cron string: "{value}"')
        # croniter reads a field "R" or "H" as random or hashed; Prefect supports neither.
        if any(field.casefold() in ("r", "h") for field in value.split()):
            raise ValueError(f'Random and Hashed expressions are unsupported, received: "{value}"')
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str | None) -> str | None:
        return check_timezone(value)


class RRuleSchedule(BaseModel):
    """An RFC 5545 rule (or rule set) read by dateutil, on the wall clock of `timezone`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rrule: str
    timezone: Annotated[str | None, Field(validate_default=True)] = "UTC"

    @field_validator("rrule")
    @classmethod
    def _valid_rrule(cls, value: str) -> str:
        check_storable_text(value)
        # Length first: it bounds the parser's work.
        if len(value) > MAX_RRULE_LENGTH:
            raise ValueError(
                f'Invalid RRule string "{value[:40]}..."\n'
                f"Max length is {MAX_RRULE_LENGTH}, got {len(value)}"
            )
        try:
            _parse_rrule(value)
        except Exception as exc:  # dateutil's parser raises ValueError, TypeError, KeyError...
            raise ValueError(f'Invalid RRule string "{value[:200]}": {exc}') from None
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str | None) -> str:
        return check_timezone(value) or "UTC"


def _schedule_tag(value: Any) -> str | None:
    """Which kind a JSON object (or model) is, by its distinguishing key."""
    if isinstance(value, IntervalSchedule | CronSchedule | RRuleSchedule):
        return schedule_kind(value)
    if isinstance(value, dict):
        for key in ("interval", "cron", "rrule"):
            if key in value:
                return key
    return None


Schedule = Annotated[
    Annotated[IntervalSchedule, Tag("interval")]
    | Annotated[CronSchedule, Tag("cron")]
    | Annotated[RRuleSchedule, Tag("rrule")],
    Discriminator(
        _schedule_tag,
        custom_error_type="invalid_schedule",
        custom_error_message="a schedule is an object with one of 'interval', 'cron' or 'rrule'",
    ),
]


def schedule_kind(schedule: IntervalSchedule | CronSchedule | RRuleSchedule) -> Literal["interval", "cron", "rrule"]:
    """The kind's short name: "interval", "cron" or "rrule"."""
    if isinstance(schedule, IntervalSchedule):
        return "interval"
    if isinstance(schedule, CronSchedule):
        return "cron"
    return "rrule"


def schedule_type_name(schedule: IntervalSchedule | CronSchedule | RRuleSchedule) -> str:
    """The class name Prefect writes as a scheduled run's `created_by.display_value` when the
    schedule has no slug ("IntervalSchedule", "CronSchedule", "RRuleSchedule")."""
    return type(schedule).__name__


def schedule_timezone(schedule: IntervalSchedule | CronSchedule | RRuleSchedule) -> str:
    """The zone the schedule's dates are computed (and written, in idempotency keys) in."""
    return schedule.timezone or "UTC"


def with_anchor(schedule: IntervalSchedule | CronSchedule | RRuleSchedule,
                now: datetime) -> IntervalSchedule | CronSchedule | RRuleSchedule:
    """An interval schedule without `anchor_date` anchored at `now` (Prefect's default, taken
    when the schedule is created); any other schedule unchanged."""
    if isinstance(schedule, IntervalSchedule) and schedule.anchor_date is None:
        return schedule.model_copy(update={"anchor_date": _as_utc(now)})
    return schedule


# --- dates ----------------------------------------------------------------------------------


def dates_in(schedule: IntervalSchedule | CronSchedule | RRuleSchedule, start: datetime,
             end: datetime, max_count: int) -> list[datetime]:
    """The schedule's dates `>= start` and `<= end`, ascending, at most `max_count` (and at
    most `MAX_DATES`), as aware UTC datetimes. Naive `start`/`end` are read as UTC."""
    start, end = _as_utc(start), _as_utc(end)
    count = min(max_count, MAX_DATES)
    if count <= 0 or start > end:
        return []
    if isinstance(schedule, IntervalSchedule):
        dates = _interval_dates(schedule, start, end, count)
    elif isinstance(schedule, CronSchedule):
        dates = _cron_dates(schedule, start, end, count)
    else:
        dates = _rrule_dates(schedule, start, end, count)
    return sorted(set(dates))[:count]


def dates_to_schedule(schedule: IntervalSchedule | CronSchedule | RRuleSchedule, *,
                      start: datetime, end: datetime, min_time: timedelta, min_runs: int,
                      max_runs: int) -> list[datetime]:
    """The dates the scheduler makes runs for, for one active schedule: its dates in
    [start, end], at most `max_runs`, stopping as soon as there are `min_runs` of them and the
    last is at least `start + min_time` (so `end` and `max_runs` win over `min_runs`)."""
    start = _as_utc(start)
    threshold = _shifted(start, min_time) or LATEST
    chosen: list[datetime] = []
    for date in dates_in(schedule, start, end, max_runs):
        chosen.append(date)
        if len(chosen) >= min_runs and date >= threshold:
            break
    return chosen


def _interval_dates(schedule: IntervalSchedule, start: datetime, end: datetime,
                    count: int) -> list[datetime]:
    anchor = schedule.anchor_date
    if anchor is None:
        raise ValueError("an interval schedule needs its anchor_date: call with_anchor first")
    interval = schedule.interval
    dates: list[datetime] = []
    if interval < _ONE_DAY:
        # Elapsed time: k = ceil((start - anchor) / interval), then every interval.
        k = -((anchor - start) // interval)
        for step in range(count):
            try:
                date = anchor + (k + step) * interval
            except OverflowError:
                break
            if date > end or date > LATEST:
                break
            if date >= EARLIEST:
                dates.append(date)
        return dates
    # A day or more: steps on the local wall clock, placed in the zone afterwards. The first
    # k comes from the wall-clock distance; one step back covers a DST offset either way.
    zone = _zone(schedule.timezone)
    local_anchor = _local_naive(anchor, zone)
    local_start = _local_naive(start, zone)
    if local_anchor is None or local_start is None:
        return dates
    k = (local_start - local_anchor) // interval - 1
    for _ in range(count + 3):
        try:
            local = local_anchor + k * interval
        except OverflowError:
            break
        k += 1
        placed = _placed(local, zone)
        if placed is None:
            if local > local_start:  # past year 9999
                break
            continue
        date = placed
        if date > end:
            break
        if date >= start:
            dates.append(date)
            if len(dates) >= count:
                break
    return dates


def _cron_dates(schedule: CronSchedule, start: datetime, end: datetime,
                count: int) -> list[datetime]:
    zone = _zone(schedule.timezone)
    local_start = _local_naive(start, zone)
    if local_start is None:
        return []
    # As Prefect does: one second before `start`, so that `start` itself can match, and a
    # fraction of a second rounded up.
    base = _shifted(local_start, -_ONE_SECOND)
    if base is None:
        return []
    if base.microsecond:
        base = base + _ONE_SECOND
    dates: list[datetime] = []
    try:
        cron = croniter(schedule.cron, base, day_or=schedule.day_or)
        # Each call moves forward in local time; the bound only guards against a croniter
        # that would return the same time again.
        for _ in range(2 * MAX_DATES + 10):
            local = cron.get_next(datetime)
            date = _placed(local, zone)
            if date is None or date > end:
                break
            if date >= start and date not in dates:
                dates.append(date)
                if len(dates) >= count:
                    break
    except (CroniterError, ValueError, OverflowError, KeyError, IndexError):
        # No further date (croniter gives up after decades without a match), or past 9999.
        pass
    return dates


# --- rrules ---------------------------------------------------------------------------------

# Calendar months dateutil may examine in one evaluation, per frequency: dateutil re-derives
# its per-month tables on every new month it reaches, and a rule whose filters never match
# would otherwise be walked until year 9999 (minutes or hours for a MINUTELY or SECONDLY
# rule). Finer frequencies do more work per month, so they get fewer months; a rule with no
# occurrence within that horizon after `start` yields fewer (or no) dates.
_WALK_MONTHS = {
    YEARLY: 1_000,  # one table per year for a YEARLY rule: a thousand years
    MONTHLY: 12 * 400,  # the Gregorian calendar repeats every 400 years
    WEEKLY: 12 * 100,
    DAILY: 12 * 100,
    HOURLY: 12 * 20,
    MINUTELY: 12,
    SECONDLY: 1,
}
# Occurrences dateutil may produce in one evaluation, including those before `start` (a rule
# with COUNT is walked from its DTSTART).
_WALK_OCCURRENCES = 50_000
_PERIOD_SECONDS = {WEEKLY: 7 * 86_400, DAILY: 86_400, HOURLY: 3_600, MINUTELY: 60, SECONDLY: 1}


class _WalkExhausted(Exception):
    """dateutil examined more months than the evaluation allows."""


class _BoundedRRule(rrule):
    """dateutil's rrule with a budget of months examined.

    dateutil reads `_bynweekday` once each time it rebuilds its tables for a new month (or a
    new year for YEARLY rules), and at no other point of the walk, so counting those reads
    bounds the walk without changing a single occurrence. If a later dateutil stopped reading
    it there, the budget would simply never run out.
    """

    def __init__(self, months: int, **kwargs: Any) -> None:
        self._months_left = months
        super().__init__(**kwargs)

    @property
    def _bynweekday(self) -> Any:
        self._months_left -= 1
        if self._months_left < 0:
            raise _WalkExhausted
        return self._bynweekday_value

    @_bynweekday.setter
    def _bynweekday(self, value: Any) -> None:
        self._bynweekday_value = value


class _Capped:
    """One rule of a set, ending quietly where its walk must stop (budget spent, or dateutil
    finding it empty), so that the set's other rules go on: an EXRULE that runs out stops
    excluding, it does not end the schedule."""

    def __init__(self, rule: _BoundedRRule) -> None:
        self.rule = rule

    def __iter__(self) -> Iterator[datetime]:
        try:
            yield from self.rule
        except (_WalkExhausted, ValueError, OverflowError):
            return


def _parse_rrule(text: str) -> rruleset:
    """The rule set as dateutil reads it, DTSTART defaulting to 2020-01-01 as in Prefect."""
    parsed = rrulestr(text, dtstart=RRULE_DEFAULT_DTSTART, forceset=True, cache=False)
    assert isinstance(parsed, rruleset)
    # dateutil takes INTERVAL=0 and then repeats one date forever; RFC 5545 wants >= 1.
    if any(rule._interval < 1 for rule in [*parsed._rrule, *parsed._exrule]):
        raise ValueError("INTERVAL must be a positive integer")
    return parsed


def _naive(value: datetime) -> datetime:
    return value.replace(tzinfo=None)


def _rule_kwargs(rule: rrule) -> dict[str, Any]:
    """The keyword arguments that rebuild `rule` (what dateutil's `rrule.replace` uses)."""
    kwargs: dict[str, Any] = {
        "interval": rule._interval, "count": rule._count, "dtstart": _naive(rule._dtstart),
        "freq": rule._freq, "until": _naive(rule._until) if rule._until else None,
        "wkst": rule._wkst, "cache": False,
    }
    kwargs.update(rule._original_rule)
    return kwargs


def _reanchored(kwargs: dict[str, Any], before: datetime) -> datetime:
    """The latest DTSTART `dtstart + k periods` (k >= 0) not after `before`: from it the rule
    yields exactly the occurrences the original yields from there on, as long as the rule
    has no COUNT (counted from the first DTSTART). Month-based rules keep their day of month
    (dateutil derives default filters from it); when no such date fits, DTSTART stays."""
    dtstart: datetime = kwargs["dtstart"]
    if dtstart >= before or kwargs["count"] is not None:
        return dtstart
    freq, interval = kwargs["freq"], kwargs["interval"]
    if interval < 1:  # rejected by validation; never divide by it
        return dtstart
    if freq in _PERIOD_SECONDS:
        try:
            period = timedelta(seconds=_PERIOD_SECONDS[freq] * interval)
        except OverflowError:  # a period longer than the calendar: DTSTART is the only start
            return dtstart
        return dtstart + ((before - dtstart) // period) * period
    months = interval * (12 if freq == YEARLY else 1)
    periods = ((before.year - dtstart.year) * 12 + before.month - dtstart.month) // months
    for k in range(periods, max(periods - 8, 0), -1):  # a 31st or a 29 February may not fit
        try:
            candidate = dtstart + relativedelta(months=k * months)
        except (OverflowError, ValueError):
            continue
        if candidate.day == dtstart.day and candidate <= before:
            return candidate
    return dtstart


def _bounded_rule(rule: rrule, before: datetime, until_cap: datetime) -> _Capped:
    kwargs = _rule_kwargs(rule)
    kwargs["dtstart"] = _reanchored(kwargs, before)
    if kwargs["count"] is None:  # dateutil warns when COUNT and UNTIL are both given
        kwargs["until"] = min(kwargs["until"] or until_cap, until_cap)
    return _Capped(_BoundedRRule(_WALK_MONTHS[kwargs["freq"]], **kwargs))


def _rrule_dates(schedule: RRuleSchedule, start: datetime, end: datetime,
                 count: int) -> list[datetime]:
    zone = _zone(schedule.timezone)
    local_start, local_end = _local_naive(start, zone), _local_naive(end, zone)
    if local_start is None or local_end is None:
        return []
    # Results are filtered on the UTC instant; a local time before `start`'s can only fall at
    # or after `start` when the offset changed during the day before (a time in a skipped
    # hour is placed after the gap), so only then is the day before walked too.
    margin = _ONE_DAY if _offset_changed(zone, start) else timedelta(0)
    before = _shifted(local_start, -margin) or local_start
    until_cap = _shifted(local_end, _ONE_DAY) or local_end
    parsed = _parse_rrule(schedule.rrule)
    bounded = rruleset(cache=False)
    try:
        for rule in parsed._rrule:
            bounded.rrule(_bounded_rule(rule, before, until_cap))
        for rule in parsed._exrule:
            bounded.exrule(_bounded_rule(rule, before, until_cap))
    except (ValueError, OverflowError):  # a rule dateutil cannot build: nothing to produce
        return []
    for rdate in parsed._rdate:
        bounded.rdate(_naive(rdate))
    for exdate in parsed._exdate:
        bounded.exdate(_naive(exdate))
    return _collect(iter(bounded), zone, start, end, before, count)


def _offset_changed(zone: ZoneInfo, instant: datetime) -> bool:
    earlier = _shifted(instant, -_ONE_DAY)
    if earlier is None:
        return False
    try:
        return earlier.astimezone(zone).utcoffset() != instant.astimezone(zone).utcoffset()
    except OverflowError:
        return False


def _collect(occurrences: Iterator[datetime], zone: ZoneInfo, start: datetime, end: datetime,
             before: datetime, count: int) -> list[datetime]:
    dates: list[datetime] = []
    try:
        for walked, local in enumerate(occurrences):
            if walked >= _WALK_OCCURRENCES:
                break
            if local < before:
                continue
            date = _placed(local, zone)
            if date is None:
                if local > before:  # past year 9999
                    break
                continue
            if date > end:
                break
            if date >= start and date not in dates:
                dates.append(date)
                if len(dates) >= count:
                    break
    except (ValueError, OverflowError):  # past year 9999
        pass
    return dates


# --- scheduled runs -------------------------------------------------------------------------

# Fixed for good: changing it would give every future scheduled run a new id.
SCHEDULED_RUN_NAMESPACE = uuid.UUID("6f1d3c52-8f0e-5a7b-9c3e-2d41b7a90e15")


def scheduled_run_id(deployment_id: uuid.UUID, schedule_id: uuid.UUID, date: datetime) -> uuid.UUID:
    """The id of the run a schedule makes for `date`: the same inputs give the same id, so a
    run scheduled twice (two scheduler passes, a retried command) is one run."""
    instant = _as_utc(date).isoformat()
    return uuid.uuid5(SCHEDULED_RUN_NAMESPACE, f"{deployment_id} {schedule_id} {instant}")


def scheduled_idempotency_key(deployment_id: uuid.UUID, schedule_id: uuid.UUID, date: datetime,
                              timezone: str | None = None) -> str:
    """`scheduled <deployment id> <schedule id> <date>` as Prefect writes it: the date in the
    schedule's zone (`schedule_timezone`, UTC by default) in Python's `str` form, e.g.
    `2026-03-11 09:00:00-04:00`."""
    local = _as_utc(date).astimezone(_zone(timezone))
    return f"scheduled {deployment_id} {schedule_id} {local}"

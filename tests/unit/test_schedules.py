"""Deployment schedules (commands/schedules.py): parsing, validation, the dates each kind
produces (time zones and DST included), the scheduler's stopping rule with the worked examples
of the behaviour contract, bounded work on pathological input, and scheduled-run ids."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from pydantic import TypeAdapter, ValidationError

from runledger.commands.bounds import LATEST
from runledger.commands.schedules import (
    MAX_DATES,
    MAX_RRULE_LENGTH,
    SCHEDULE_DEFAULTS,
    CronSchedule,
    IntervalSchedule,
    RRuleSchedule,
    Schedule,
    dates_in,
    dates_to_schedule,
    schedule_kind,
    schedule_timezone,
    schedule_type_name,
    scheduled_idempotency_key,
    scheduled_run_id,
    with_anchor,
)

SCHEDULE = TypeAdapter(Schedule)
NOW = datetime(2026, 3, 10, 12, 34, 56, tzinfo=UTC)
D = datetime(2026, 3, 10, tzinfo=UTC)  # today's 00:00 UTC
NEW_YORK = ZoneInfo("America/New_York")
BERLIN = ZoneInfo("Europe/Berlin")


def day(n: int) -> datetime:
    return D + timedelta(days=n)


def days(first: int, last: int) -> list[datetime]:
    return [day(n) for n in range(first, last + 1)]


DAILY = IntervalSchedule(interval=timedelta(days=1), anchor_date=datetime(2020, 1, 1, tzinfo=UTC))


def schedule_runs(schedule=DAILY, *, start=None, end=None, min_time=None, min_runs=None,
                  max_runs=None) -> list[datetime]:
    """The scheduler's call with its defaults filled in, as the decider will do it."""
    start = NOW if start is None else start
    return dates_to_schedule(
        schedule,
        start=start,
        end=start + SCHEDULE_DEFAULTS.max_time if end is None else end,
        min_time=SCHEDULE_DEFAULTS.min_time if min_time is None else min_time,
        min_runs=SCHEDULE_DEFAULTS.min_runs if min_runs is None else min_runs,
        max_runs=SCHEDULE_DEFAULTS.max_runs if max_runs is None else max_runs,
    )


# --- the worked examples of the scheduler (daily, anchored 2020-01-01T00:00Z) ---------------


def test_defaults():
    assert SCHEDULE_DEFAULTS.min_runs == 3
    assert SCHEDULE_DEFAULTS.max_runs == 100
    assert SCHEDULE_DEFAULTS.min_time == timedelta(hours=1)
    assert SCHEDULE_DEFAULTS.max_time == timedelta(days=100)
    assert schedule_runs() == days(1, 3)


def test_min_runs_5():
    assert schedule_runs(min_runs=5) == days(1, 5)


def test_end_wins_over_min_runs():
    assert schedule_runs(end=NOW + timedelta(days=7), min_runs=100) == days(1, 7)


def test_end_beyond_the_minimums():
    assert schedule_runs(end=NOW + timedelta(days=17)) == days(1, 3)


def test_min_time_17_days():
    assert schedule_runs(min_time=timedelta(days=17)) == days(1, 18)


def test_future_window():
    start = NOW + timedelta(days=100)
    assert schedule_runs(start=start, end=NOW + timedelta(days=110), min_runs=100) == days(101, 110)


def test_max_runs_wins():
    start = NOW + timedelta(days=100)
    assert schedule_runs(start=start, end=NOW + timedelta(days=150), max_runs=3) == days(101, 103)


def test_backfill():
    dates = schedule_runs(start=NOW - timedelta(days=20), end=NOW, min_runs=100)
    assert dates == days(-19, 0)
    assert len(dates) == 20


def test_backfill_far_in_the_past():
    # min_runs 100 (as in the backfill above), so that `end` is what stops it.
    start, end = NOW - timedelta(days=1000), NOW - timedelta(days=990)
    assert schedule_runs(start=start, end=end, min_runs=100) == days(-999, -990)
    assert schedule_runs(start=start, end=end) == days(-999, -997)


def test_start_on_a_date_is_included_and_end_too():
    assert dates_in(DAILY, day(1), day(3), 10) == days(1, 3)


def test_naive_start_and_end_are_utc():
    naive = dates_in(DAILY, day(1).replace(tzinfo=None), day(3).replace(tzinfo=None), 10)
    assert naive == days(1, 3)
    assert all(d.tzinfo is UTC for d in naive)


def test_empty_ranges():
    assert dates_in(DAILY, day(3), day(1), 10) == []
    assert dates_in(DAILY, day(1), day(3), 0) == []
    assert dates_in(DAILY, day(1) + timedelta(hours=1), day(1) + timedelta(hours=2), 10) == []


# --- parsing and defaults -------------------------------------------------------------------


def test_parses_each_kind_by_its_key():
    interval = SCHEDULE.validate_python({"interval": 3600, "anchor_date": "2020-01-01T00:00:00Z"})
    cron = SCHEDULE.validate_python({"cron": "0 9 * * *", "timezone": "America/New_York"})
    rrule = SCHEDULE.validate_python({"rrule": "FREQ=DAILY"})
    assert isinstance(interval, IntervalSchedule) and interval.interval == timedelta(hours=1)
    assert isinstance(cron, CronSchedule) and cron.day_or is True
    assert isinstance(rrule, RRuleSchedule)
    assert [schedule_kind(s) for s in (interval, cron, rrule)] == ["interval", "cron", "rrule"]
    assert [schedule_type_name(s) for s in (interval, cron, rrule)] == [
        "IntervalSchedule", "CronSchedule", "RRuleSchedule"]


def test_prefect_defaults_and_json_shape():
    interval = SCHEDULE.validate_python({"interval": 90.5})
    assert interval.anchor_date is None and interval.timezone == "UTC"
    assert SCHEDULE.validate_python({"cron": "* * * * *"}).timezone is None
    assert SCHEDULE.validate_python({"rrule": "FREQ=DAILY", "timezone": None}).timezone == "UTC"
    anchored = SCHEDULE.validate_python(
        {"interval": 90.5, "anchor_date": "2020-01-01T01:00:00+01:00"})
    assert anchored.model_dump(mode="json") == {
        "interval": 90.5, "anchor_date": "2020-01-01T00:00:00Z", "timezone": "UTC"}
    # A naive anchor is UTC, as Prefect reads it.
    naive = IntervalSchedule(interval=timedelta(days=1), anchor_date=datetime(2020, 1, 1))
    assert naive.anchor_date == datetime(2020, 1, 1, tzinfo=UTC)
    # A dump reads back as the same schedule.
    for schedule in (anchored, SCHEDULE.validate_python({"cron": "0 9 * * 1-5", "day_or": False}),
                     SCHEDULE.validate_python({"rrule": "FREQ=WEEKLY;BYDAY=MO", "timezone": "Europe/Berlin"})):
        assert SCHEDULE.validate_json(SCHEDULE.dump_json(schedule)) == schedule


def test_with_anchor_fills_only_a_missing_anchor():
    fresh = IntervalSchedule(interval=timedelta(hours=1))
    anchored = with_anchor(fresh, NOW)
    assert isinstance(anchored, IntervalSchedule) and anchored.anchor_date == NOW
    assert with_anchor(anchored, NOW + timedelta(days=1)) == anchored
    cron = CronSchedule(cron="* * * * *")
    assert with_anchor(cron, NOW) is cron
    with pytest.raises(ValueError, match="with_anchor"):
        dates_in(fresh, NOW, NOW + timedelta(days=1), 3)


def test_schedule_timezone():
    assert schedule_timezone(CronSchedule(cron="* * * * *")) == "UTC"
    assert schedule_timezone(CronSchedule(cron="* * * * *", timezone="Europe/Berlin")) == "Europe/Berlin"


@pytest.mark.parametrize(("payload", "message"), [
    ({"interval": 0}, "interval must be positive"),
    ({"interval": -5}, "interval must be positive"),
    ({"interval": 1e-9}, "interval must be positive"),  # rounds to 0 microseconds
    ({"interval": "soon"}, "interval"),
    ({"interval": 60, "timezone": "Mars/Olympus"}, "Invalid timezone"),
    ({"interval": 60, "anchor_date": "10000-01-01T00:00:00Z"}, "anchor_date"),
    ({"interval": 60, "every": 2}, "Extra inputs are not permitted"),
    ({"cron": "0 0 * *"}, "Invalid cron string"),
    ({"cron": "not a cron"}, "Invalid cron string"),
    ({"cron": "R * * * *"}, "Random and Hashed"),
    ({"cron": "H * * * *"}, "Invalid cron string"),
    ({"cron": "0 0 * * * " * 300}, "longer than"),
    ({"cron": "0 9 * * *", "timezone": "EST5EDT-ish"}, "Invalid timezone"),
    ({"cron": "0 9 * * *", "day_or": "sometimes"}, "day_or"),
    ({"rrule": "FREQ=BLAH"}, "Invalid RRule string"),
    ({"rrule": "FREQ=DAILY;BYHOUR=25"}, "Invalid RRule string"),
    ({"rrule": "FREQ=DAILY;UNTIL=20300101T000000Z"}, "UNTIL"),  # aware UNTIL, floating DTSTART
    ({"rrule": "RDATE:" + ",".join(["20260101T000000Z"] * 400)}, f"Max length is {MAX_RRULE_LENGTH}"),
    ({"rrule": "FREQ=DAILY", "timezone": "Nowhere/Special"}, "Invalid timezone"),
    ({"rrule": "FREQ=DAILY\x00"}, "NUL"),
    ({"interval": 60, "cron": "* * * * *"}, "Extra inputs are not permitted"),
    ({"schedule": "daily"}, "one of 'interval', 'cron' or 'rrule'"),
    ("0 9 * * *", "one of 'interval', 'cron' or 'rrule'"),
])
def test_invalid_schedules(payload, message):
    with pytest.raises(ValidationError, match=message):
        SCHEDULE.validate_python(payload)


def test_valid_unusual_inputs():
    # Croniter's extensions Prefect accepts: a seconds field, aliases.
    SCHEDULE.validate_python({"cron": "0 0 * * * 30"})
    SCHEDULE.validate_python({"cron": "@daily"})
    # An rrule set with its own DTSTART, exclusions and extra dates.
    SCHEDULE.validate_python({"rrule": "DTSTART:20260101T090000\nRRULE:FREQ=DAILY;UNTIL=20260201T000000\n"
                                       "EXDATE:20260102T090000\nRDATE:20260301T120000"})
    # Prefect lets an empty time zone through; it means UTC.
    assert dates_in(CronSchedule(cron="0 0 * * *", timezone=""), NOW, NOW + timedelta(days=1), 5) == [day(1)]


# --- intervals ------------------------------------------------------------------------------


def test_sub_day_interval_in_elapsed_time():
    every_90_min = IntervalSchedule(interval=timedelta(minutes=90), anchor_date=D)
    assert dates_in(every_90_min, NOW, NOW + timedelta(hours=4), 10) == [
        D + timedelta(minutes=90 * k) for k in (9, 10, 11)]


def test_dates_before_the_anchor():
    schedule = IntervalSchedule(interval=timedelta(hours=7), anchor_date=D)
    assert dates_in(schedule, D - timedelta(hours=15), D, 10) == [
        D - timedelta(hours=14), D - timedelta(hours=7), D]


def test_hourly_interval_follows_utc_across_dst():
    """New York springs forward at 2026-03-08 02:00 local: an hourly interval skips 02:00 local
    and stays on every UTC hour (Prefect's documented behaviour)."""
    start = datetime(2026, 3, 7, 23, tzinfo=NEW_YORK)
    schedule = IntervalSchedule(interval=timedelta(hours=1), anchor_date=start, timezone="America/New_York")
    dates = dates_in(schedule, start, start + timedelta(hours=10), 5)
    assert [d.astimezone(NEW_YORK).hour for d in dates] == [23, 0, 1, 3, 4]
    assert [d.hour for d in dates] == [4, 5, 6, 7, 8]


@pytest.mark.parametrize(("zone", "spring", "autumn"), [
    ("America/New_York", datetime(2026, 3, 8), datetime(2026, 11, 1)),
    ("Europe/Berlin", datetime(2026, 3, 29), datetime(2026, 10, 25)),
])
def test_daily_interval_stays_at_nine_local(zone, spring, autumn):
    tz = ZoneInfo(zone)
    anchor = datetime(2026, 1, 5, 9, tzinfo=tz)
    schedule = IntervalSchedule(interval=timedelta(days=1), anchor_date=anchor, timezone=zone)
    for change in (spring, autumn):
        start = (change - timedelta(days=3)).replace(tzinfo=tz)
        dates = dates_in(schedule, start, start + timedelta(days=7), 7)
        assert len(dates) == 7
        assert {d.astimezone(tz).time().isoformat() for d in dates} == {"09:00:00"}
        assert len({d.utcoffset() for d in dates}) == 1 and all(d.tzinfo is UTC for d in dates)
        assert len({d.astimezone(tz).utcoffset() for d in dates}) == 2  # the change is inside
    # Asked from the summer, with the anchor in winter: still 09:00 local.
    summer = dates_in(schedule, datetime(2026, 7, 1, tzinfo=UTC), datetime(2026, 7, 4, tzinfo=UTC), 3)
    assert [d.astimezone(tz).hour for d in summer] == [9, 9, 9]


def test_daily_interval_in_utc_ignores_local_dst():
    schedule = IntervalSchedule(interval=timedelta(days=1), anchor_date=datetime(2026, 3, 1, 14, tzinfo=UTC))
    dates = dates_in(schedule, datetime(2026, 3, 6, tzinfo=UTC), datetime(2026, 3, 10, tzinfo=UTC), 5)
    assert [d.hour for d in dates] == [14, 14, 14, 14]
    assert [d.astimezone(NEW_YORK).hour for d in dates] == [9, 9, 10, 10]


# --- cron -----------------------------------------------------------------------------------


def test_cron_basics():
    every_15 = CronSchedule(cron="*/15 * * * *")
    assert dates_in(every_15, NOW, NOW + timedelta(hours=1), 10) == [
        NOW.replace(minute=m, second=0) for m in (45,)] + [
        (NOW + timedelta(hours=1)).replace(minute=m, second=0) for m in (0, 15, 30)]
    # `start` itself is a date when it matches.
    assert dates_in(every_15, D, D + timedelta(minutes=20), 10) == [D, D + timedelta(minutes=15)]
    # day_or=False: the 13th only when it is a Friday.
    friday_13 = CronSchedule(cron="0 0 13 * 5", day_or=False)
    assert dates_in(friday_13, NOW, datetime(2027, 12, 31, tzinfo=UTC), 10) == [
        datetime(2026, 3, 13, tzinfo=UTC), datetime(2026, 11, 13, tzinfo=UTC),
        datetime(2027, 8, 13, tzinfo=UTC)]
    either = CronSchedule(cron="0 0 13 * 5")
    assert len(dates_in(either, NOW, NOW + timedelta(days=31), 100)) > 2


@pytest.mark.parametrize(("zone", "spring", "autumn"), [
    ("America/New_York", datetime(2026, 3, 8), datetime(2026, 11, 1)),
    ("Europe/Berlin", datetime(2026, 3, 29), datetime(2026, 10, 25)),
])
def test_daily_cron_stays_at_nine_local(zone, spring, autumn):
    tz = ZoneInfo(zone)
    schedule = CronSchedule(cron="0 9 * * *", timezone=zone)
    for change in (spring, autumn):
        start = (change - timedelta(days=3)).replace(tzinfo=tz)
        dates = dates_in(schedule, start, start + timedelta(days=7), 7)
        assert len(dates) == 7
        assert {d.astimezone(tz).time().isoformat() for d in dates} == {"09:00:00"}
        assert len({d.astimezone(tz).utcoffset() for d in dates}) == 2


def test_hourly_cron_across_dst_in_new_york():
    """As Prefect's own tests: an hourly cron fires on each new local hour."""
    hourly = CronSchedule(cron="0 * * * *", timezone="America/New_York")
    spring = dates_in(hourly, datetime(2018, 3, 10, 23, tzinfo=NEW_YORK), LATEST, 5)
    assert [d.astimezone(NEW_YORK).hour for d in spring] == [23, 0, 1, 3, 4]
    assert [d.hour for d in spring] == [4, 5, 6, 7, 8]
    autumn = dates_in(hourly, datetime(2018, 11, 3, 23, tzinfo=NEW_YORK), LATEST, 5)
    assert [d.astimezone(NEW_YORK).hour for d in autumn] == [23, 0, 1, 2, 3]
    assert [d.hour for d in autumn] == [3, 4, 5, 7, 8]


def test_cron_near_a_dst_boundary():
    """Prefect's regression case: a start on the day of the change, before the change."""
    schedule = CronSchedule(cron="10 0 * * *", timezone="America/Montreal")
    dates = dates_in(schedule, datetime(2023, 3, 12, 5, 10, 2, tzinfo=UTC), LATEST, 5)
    assert [d.astimezone(NEW_YORK).hour for d in dates] == [0] * 5
    assert [d.hour for d in dates] == [4] * 5


# --- rrule ----------------------------------------------------------------------------------


def test_rrule_basics():
    # Without DTSTART the rule starts 2020-01-01T00:00 (so a daily rule runs at midnight).
    assert dates_in(RRuleSchedule(rrule="FREQ=DAILY"), NOW, NOW + timedelta(days=3), 10) == days(1, 3)
    weekly = RRuleSchedule(rrule="RRULE:FREQ=WEEKLY;BYDAY=MO,FR;BYHOUR=6")
    assert dates_in(weekly, NOW, NOW + timedelta(days=7), 10) == [
        datetime(2026, 3, 13, 6, tzinfo=UTC), datetime(2026, 3, 16, 6, tzinfo=UTC)]
    # COUNT counts from DTSTART; UNTIL ends the rule.
    counted = RRuleSchedule(rrule="DTSTART:20260301T000000\nRRULE:FREQ=DAILY;COUNT=12")
    assert dates_in(counted, NOW, NOW + timedelta(days=30), 100) == days(1, 2)
    until = RRuleSchedule(rrule="DTSTART:20260301T000000\nRRULE:FREQ=DAILY;UNTIL=20260312T000000")
    assert dates_in(until, NOW, NOW + timedelta(days=30), 100) == days(1, 2)


def test_rrule_set():
    rules = RRuleSchedule(rrule="DTSTART:20260301T120000\nRRULE:FREQ=DAILY;INTERVAL=2\n"
                                "EXDATE:20260313T120000\nRDATE:20260312T080000")
    noon = timedelta(hours=12)
    assert dates_in(rules, NOW, NOW + timedelta(days=6), 10) == [
        day(1) + noon, day(2) + timedelta(hours=8), day(5) + noon]


def test_rrule_dtstart_zone_is_the_schedules():
    """Prefect relabels DTSTART with the schedule's zone, keeping its wall-clock digits."""
    text = "DTSTART;TZID=Asia/Tokyo:20260301T090000\nRRULE:FREQ=DAILY"
    berlin = RRuleSchedule(rrule=text, timezone="Europe/Berlin")
    assert dates_in(berlin, NOW, NOW + timedelta(days=1), 1) == [datetime(2026, 3, 11, 8, tzinfo=UTC)]


@pytest.mark.parametrize("zone", ["America/New_York", "Europe/Berlin"])
def test_rrule_daily_stays_at_nine_local(zone):
    tz = ZoneInfo(zone)
    schedule = RRuleSchedule(rrule="FREQ=DAILY;BYHOUR=9;BYMINUTE=0;BYSECOND=0", timezone=zone)
    dates = dates_in(schedule, datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 11, 30, tzinfo=UTC), 1000)
    assert len(dates) == 274
    assert {d.astimezone(tz).time().isoformat() for d in dates} == {"09:00:00"}


def test_rrule_with_an_old_dtstart_is_reanchored_without_changing_dates():
    old = RRuleSchedule(rrule="DTSTART:19000101T000700\nRRULE:FREQ=MINUTELY;INTERVAL=13")
    dates = dates_in(old, NOW, NOW + timedelta(hours=1), 100)
    origin = datetime(1900, 1, 1, 0, 7, tzinfo=UTC)
    assert dates and all((d - origin) % timedelta(minutes=13) == timedelta(0) for d in dates)
    assert dates[0] - NOW < timedelta(minutes=13) and len(dates) in (4, 5)
    monthly = RRuleSchedule(rrule="DTSTART:00010131T000000\nRRULE:FREQ=MONTHLY;INTERVAL=5")
    found = dates_in(monthly, NOW, NOW + timedelta(days=3 * 365), 100)
    assert found and all(d.day == 31 for d in found)
    # Every fifth month from January of year 1; only months with a 31st yield a date.
    assert all(((d.year - 1) * 12 + d.month - 1) % 5 == 0 for d in found)


# --- bounded work ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "FREQ=YEARLY;BYMONTH=2;BYMONTHDAY=30",
    "FREQ=MONTHLY;BYMONTH=4;BYMONTHDAY=31",
    "FREQ=WEEKLY;BYMONTH=2;BYMONTHDAY=30",
    "FREQ=DAILY;BYMONTH=2;BYMONTHDAY=30",
    "FREQ=HOURLY;BYMONTH=2;BYMONTHDAY=30",
    "FREQ=MINUTELY;BYMONTH=2;BYMONTHDAY=30;BYHOUR=3",
    "FREQ=SECONDLY;BYMONTH=2;BYMONTHDAY=30",
    "FREQ=SECONDLY;BYMONTH=2;BYMONTHDAY=30;BYHOUR=23",
    "DTSTART:00010101T000000\nRRULE:FREQ=SECONDLY",
    "DTSTART:20200101T000000\nRRULE:FREQ=SECONDLY;COUNT=1000000000",
    "DTSTART:99991230T000000\nRRULE:FREQ=SECONDLY",
    "DTSTART:20300101T000000\nRRULE:FREQ=DAILY",
    "DTSTART:20200101T000000\nRRULE:FREQ=DAILY;UNTIL=20200105T000000",
])
def test_pathological_rrules_return(text):
    for zone in ("UTC", "America/New_York"):
        schedule = RRuleSchedule(rrule=text, timezone=zone)
        dates = dates_in(schedule, NOW, NOW + timedelta(days=100), 100)
        assert dates == sorted(dates) and len(dates) <= 100
        whole = dates_in(schedule, datetime(1, 1, 1), datetime(9999, 12, 31), 10**9)
        assert len(whole) <= MAX_DATES


def test_an_exclusion_rule_that_never_matches_excludes_nothing():
    schedule = RRuleSchedule(rrule="RRULE:FREQ=DAILY\nEXRULE:FREQ=DAILY;BYMONTH=2;BYMONTHDAY=30")
    assert dates_in(schedule, NOW, NOW + timedelta(days=3), 10) == days(1, 3)
    exclusions = RRuleSchedule(rrule="RRULE:FREQ=DAILY\nEXRULE:FREQ=WEEKLY;BYDAY=WE")
    assert dates_in(exclusions, NOW, NOW + timedelta(days=3), 10) == [day(2), day(3)]  # 11th: Wed


@pytest.mark.parametrize("text", ["FREQ=DAILY;INTERVAL=0", "FREQ=HOURLY;INTERVAL=-2"])
def test_rrule_interval_must_be_positive(text):
    """dateutil takes INTERVAL=0 and repeats one date forever; Prefect would let it through."""
    with pytest.raises(ValidationError, match="INTERVAL must be a positive integer"):
        RRuleSchedule(rrule=text)


def test_sparse_rrule_still_found():
    """29 February on a Monday: every 28 years or so."""
    schedule = RRuleSchedule(rrule="FREQ=YEARLY;BYMONTH=2;BYMONTHDAY=29;BYDAY=MO")
    assert dates_in(schedule, NOW, LATEST, 2) == [datetime(2044, 2, 29, tzinfo=UTC), datetime(2072, 2, 29, tzinfo=UTC)]


@pytest.mark.parametrize("cron", ["0 0 30 2 *", "0 0 31 4 *", "* * * * *", "0 0 29 2 *"])
def test_pathological_crons_return(cron):
    schedule = CronSchedule(cron=cron, timezone="Europe/Berlin")
    dates_in(schedule, NOW, NOW + timedelta(days=100), 100)
    assert len(dates_in(schedule, datetime(1, 1, 1), datetime(9999, 12, 31), 10**9)) <= MAX_DATES


def test_cron_never_matching_gives_nothing():
    assert dates_in(CronSchedule(cron="0 0 30 2 *"), NOW, LATEST, 10) == []


@pytest.mark.parametrize("interval", [
    timedelta(microseconds=1), timedelta(seconds=1), timedelta(days=1), timedelta(days=1, microseconds=1),
    timedelta(days=36_500), timedelta(days=999_999_999),
])
@pytest.mark.parametrize("anchor", [datetime(1, 1, 2, tzinfo=UTC), datetime(2020, 1, 1, tzinfo=UTC), LATEST])
@pytest.mark.parametrize("zone", ["UTC", "Pacific/Kiritimati", "America/Adak"])
def test_extreme_intervals_return(interval, anchor, zone):
    schedule = IntervalSchedule(interval=interval, anchor_date=anchor, timezone=zone)
    for start, end in [(NOW, NOW + timedelta(days=100)), (datetime(1, 1, 1), datetime(9999, 12, 31))]:
        dates = dates_in(schedule, start, end, 10**9)
        assert len(dates) <= MAX_DATES and dates == sorted(set(dates))


def test_one_second_interval_over_100_days():
    schedule = IntervalSchedule(interval=timedelta(seconds=1), anchor_date=datetime(2020, 1, 1, tzinfo=UTC))
    dates = dates_in(schedule, NOW, NOW + timedelta(days=100), 100)
    assert dates == [NOW + timedelta(seconds=k) for k in range(100)]


def test_dates_to_schedule_with_huge_min_time():
    assert schedule_runs(min_time=timedelta(days=999_999_999), max_runs=5) == days(1, 5)


# --- scheduled runs -------------------------------------------------------------------------


def test_scheduled_run_id_is_deterministic():
    deployment, schedule = uuid.uuid4(), uuid.uuid4()
    first = scheduled_run_id(deployment, schedule, day(1))
    assert first == scheduled_run_id(deployment, schedule, day(1))
    assert first == scheduled_run_id(deployment, schedule, day(1).astimezone(NEW_YORK))  # same instant
    assert first != scheduled_run_id(deployment, schedule, day(2))
    assert first != scheduled_run_id(deployment, uuid.uuid4(), day(1))
    assert first != scheduled_run_id(uuid.uuid4(), schedule, day(1))
    pinned = scheduled_run_id(uuid.UUID(int=1), uuid.UUID(int=2), datetime(2026, 3, 11, tzinfo=UTC))
    assert pinned == scheduled_run_id(uuid.UUID(int=1), uuid.UUID(int=2), datetime(2026, 3, 11, tzinfo=UTC))
    assert pinned.version == 5


def test_scheduled_idempotency_key_as_prefect_writes_it():
    deployment = uuid.UUID("11111111-1111-1111-1111-111111111111")
    schedule = uuid.UUID("22222222-2222-2222-2222-222222222222")
    assert scheduled_idempotency_key(deployment, schedule, day(1)) == (
        "scheduled 11111111-1111-1111-1111-111111111111 22222222-2222-2222-2222-222222222222 "
        "2026-03-11 00:00:00+00:00")
    local = scheduled_idempotency_key(deployment, schedule, datetime(2026, 7, 1, 13, tzinfo=UTC),
                                      timezone="America/New_York")
    assert local.endswith(" 2026-07-01 09:00:00-04:00")

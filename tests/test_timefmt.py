"""Times and durations as people read them."""

from __future__ import annotations

from nbankd.timefmt import compact_stamp, from_iso, human_duration, iso


def test_human_duration() -> None:
    """Durations read as a person would say them, to the two largest units."""
    cases = [(0.04, "0 s"), (3.25, "3.2 s"), (10, "10 s"), (303, "5 m 3 s"), (3600, "1 h")]
    cases += [(7500, "2 h 5 m"), (273600, "3 d 4 h"), (-1, "0 s")]
    assert [human_duration(s) for s, _ in cases] == [text for _, text in cases]


def test_iso_is_utc_to_the_second() -> None:
    """A timestamp is ISO 8601 in UTC without fractions; None stays None."""
    assert iso(0.9) == "1970-01-01T00:00:00+00:00"
    assert iso(None) is None


def test_from_iso_inverts_iso() -> None:
    """from_iso reads back what iso writes (to the second); None and "" stay None."""
    assert from_iso(iso(1_764_900_000.0)) == 1_764_900_000.0
    assert from_iso(None) is None and from_iso("") is None


def test_compact_stamp_is_utc_to_the_second() -> None:
    """The compact stamp of file and run names is UTC, to the second, without separators."""
    assert compact_stamp(0.9) == "19700101T000000Z"
    assert compact_stamp(1_764_900_000.0) == "20251205T020000Z"

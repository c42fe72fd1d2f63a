"""The verdicts on an input's identifier, by table (hostile round D)."""

from __future__ import annotations

import pytest

from nbankd.deposit.verdicts import Facts, Kind, at_lookup, at_publish, at_register

OURS, OTHER = "a" * 40, "b" * 40
STORED = "/arch/resources/re/rec.wav"
BASE = Facts(name="rec", sha1=OURS, target=STORED)

LOOKUP = [
    ("nothing known", {}, Kind.PROCEED, ""),
    ("lost registry answer", dict(has_record=True, record_sha1=OURS), Kind.PROCEED, ""),
    ("bytes under another identifier", dict(holders=("x",)), Kind.REJECT, "duplicate"),
    (
        "own record among holders",
        dict(holders=("rec",), has_record=True, record_sha1=OURS),
        Kind.PROCEED,
        "",
    ),
    ("identifier for other bytes", dict(has_record=True, record_sha1=OTHER), Kind.REJECT,
     "name-taken"),
    ("automatic identifier taken", dict(auto=True, has_record=True, record_sha1=OTHER),
     Kind.RENAME, "auto-id-taken"),
    ("stored, not registered", dict(stored=(STORED,)), Kind.REJECT, "stored-elsewhere"),
    ("automatic, stored unregistered", dict(auto=True, stored=(STORED,)), Kind.RENAME,
     "auto-id-taken"),
    (
        "same identifier, bytes and name",
        dict(has_record=True, record_sha1=OURS, stored=(STORED,), stored_sha1=OURS),
        Kind.ALREADY,
        "already-deposited",
    ),
    (
        "same bytes, another stored name",
        dict(has_record=True, record_sha1=OURS, stored=("/arch/resources/re/rec.bin",),
             stored_sha1=OURS),
        Kind.REJECT,
        "duplicate",
    ),
    (
        "same bytes, another stored name, registered by us",
        dict(registered=True, has_record=True, record_sha1=OURS,
             stored=("/arch/resources/re/rec.bin",), stored_sha1=OURS),
        Kind.SUPERSEDED,
        "duplicate",
    ),
    (
        "same name in the other stub (filed by nbank 0.13)",
        dict(has_record=True, record_sha1=OURS, stored=("/arch/resources/r./rec.wav",),
             stored_sha1=OURS),
        Kind.REJECT,
        "duplicate",
    ),
    (
        "another input's record for these bytes, not stored yet",
        dict(has_record=True, record_sha1=OURS, record_matches=False),
        Kind.RECHECK,
        "identifier-busy",
    ),
    (
        "stored copy damaged",
        dict(has_record=True, record_sha1=OURS, stored=(STORED,), stored_sha1=OTHER),
        Kind.REJECT,
        "stored-damaged",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("case", "facts", "kind", "code"), LOOKUP, ids=[c[0] for c in LOOKUP])
def test_lookup_verdicts(case: str, facts: dict[str, object], kind: Kind, code: str) -> None:
    """Each combination of registry and archive facts gets its one verdict at lookup."""
    verdict = at_lookup(Facts(**{**BASE.__dict__, **facts}))  # type: ignore[arg-type]
    assert (verdict.kind, verdict.code) == (kind, code)


REGISTER = [
    ("record is ours", dict(has_record=True, record_sha1=OURS), Kind.PROCEED, ""),
    ("record for other bytes", dict(has_record=True, record_sha1=OTHER), Kind.REJECT,
     "name-taken"),
    ("automatic, record for other bytes", dict(auto=True, has_record=True, record_sha1=OTHER),
     Kind.RENAME, "auto-id-taken"),
    ("sha1 held by another identifier", dict(holders=("x",)), Kind.REJECT, "duplicate"),
    ("another input's record for these bytes", dict(has_record=True, record_sha1=OURS,
     record_matches=False), Kind.RECHECK, "identifier-busy"),
    ("our own record, described otherwise since", dict(has_record=True, record_sha1=OURS,
     record_matches=False, registered=True), Kind.PROCEED, ""),
]  # fmt: skip


@pytest.mark.parametrize(("case", "facts", "kind", "code"), REGISTER, ids=[c[0] for c in REGISTER])
def test_register_verdicts(case: str, facts: dict[str, object], kind: Kind, code: str) -> None:
    """A refusal by the registry is ours, a taken name, or a duplicate, by table."""
    verdict = at_register(Facts(**{**BASE.__dict__, **facts}))  # type: ignore[arg-type]
    assert (verdict.kind, verdict.code) == (kind, code)


PUBLISH = [
    ("same bytes", dict(stored_sha1=OURS), Kind.REJECT, "duplicate"),
    ("same bytes, registered", dict(stored_sha1=OURS, registered=True), Kind.SUPERSEDED,
     "duplicate"),
    ("other bytes", dict(stored_sha1=OTHER), Kind.REJECT, "name-taken"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "facts", "kind", "code"), PUBLISH, ids=[c[0] for c in PUBLISH])
def test_publish_verdicts(case: str, facts: dict[str, object], kind: Kind, code: str) -> None:
    """Another stored name for the identifier is a duplicate only with the same bytes."""
    f = Facts(**{**BASE.__dict__, "stored": ("/arch/resources/re/rec.bin",), **facts})  # type: ignore[arg-type]
    verdict = at_publish(f)
    assert (verdict.kind, verdict.code) == (kind, code)
    assert "/arch/resources/re/rec.bin" in verdict.message


def test_duplicate_names_the_holder() -> None:
    """A duplicate found at lookup names the identifier that holds the bytes."""
    verdict = at_lookup(Facts(name="y", sha1=OURS, target="/a/resources/y/y.wav", holders=("x",)))
    assert "registered as x" in verdict.message and "nbankctl locate x" in verdict.hint

"""The verdicts on an input's identifier (hostile round D), its claim and the read-back
of its copies, by table."""

from __future__ import annotations

from dataclasses import replace

import pytest

from nbankd.deposit.lifecycle import Kind as OutcomeKind
from nbankd.deposit.verdicts import (
    Facts,
    Kind,
    at_lookup,
    at_publish,
    at_register,
)
from nbankd.deposit.verdicts_claim import (
    after_take,
    at_claim,
    at_replay,
    sidecar_at_claim,
    unsafe_claimed,
    when_claimed,
)
from nbankd.deposit.verdicts_readback import (
    ReadBack,
    Staged,
    after_read_back,
    before_publish,
    reads_staged,
    verify_reads,
)
from nbankd.filekind import FileKind

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


@pytest.mark.parametrize("judge", [at_lookup, at_register], ids=["lookup", "register"])
def test_a_duplicate_of_a_record_without_a_stored_copy_is_never_advised_deleted(
    judge: object,
) -> None:
    """A duplicate of a record this archive stores no copy of says so and says keep."""
    f = Facts(name="y", sha1=OURS, target="/a/resources/y/y.wav", holders=("x",))
    verdict = judge(replace(f, holder_stored=False))  # type: ignore[operator]
    assert (verdict.kind, verdict.code) == (Kind.REJECT, "duplicate")
    assert "no copy of x" in verdict.message and "only copy" in verdict.message
    assert "keep this file" in verdict.hint and "delete" not in verdict.hint


def test_a_duplicate_whose_holder_is_not_known_names_no_identifier() -> None:
    """A refusal for a SHA-1 whose holder the search no longer finds says how to find it."""
    verdict = at_register(Facts(name="y", sha1=OURS, target="/a/resources/y/y.wav"))
    assert verdict.code == "duplicate" and f"search --hash {OURS}" in verdict.hint
    assert "locate another identifier" not in verdict.hint


# -- claim ----------------------------------------------------------------------------

F = FileKind
CLAIM = [
    # (case, item kind, kind found now, the entry the scan saw, outcome kind, code)
    ("a file, as seen", "file", F.FILE, True, None, None),
    ("a folder, as seen", "dir", F.DIRECTORY, True, None, None),
    ("vanished", "file", None, False, "gone", "gone"),
    ("a file become a folder", "file", F.DIRECTORY, True, "gone", "unsupported"),
    ("a folder become a file", "dir", F.FILE, True, "gone", "unsupported"),
    ("a file given a second name", "file", F.HARDLINK, True, "gone", "unsupported"),
    ("a file swapped for a link", "file", F.SYMLINK, True, "gone", "unsupported"),
    ("a folder swapped for a link", "dir", F.SYMLINK, True, "gone", "unsupported"),
    ("a file become a FIFO", "file", F.FIFO, True, "gone", "unsupported"),
    ("a file replaced by another file", "file", F.FILE, False, "gone", "gone"),
    ("a folder replaced by another folder", "dir", F.DIRECTORY, False, "gone", "gone"),
    ("an unsafe entry is moved by name", "unsafe", F.SYMLINK, True, None, None),
    ("an unsafe entry of another kind now", "unsafe", F.FILE, True, None, None),
    ("an unsafe entry replaced", "unsafe", F.FIFO, False, "gone", "gone"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "item_kind", "found", "seen", "kind", "code"), CLAIM, ids=[c[0] for c in CLAIM]
)
def test_claim_verdicts(
    case: str,
    item_kind: str,
    found: FileKind | None,
    seen: bool,
    kind: str | None,
    code: str | None,
) -> None:
    """Only a regular file with one name, or a folder, that the scan saw is taken."""
    outcome = at_claim(item_kind=item_kind, shown="/in/rec.wav", found=found, seen=seen)
    assert (outcome and (outcome.kind, outcome.code)) == (kind and (kind, code))


def test_a_file_written_to_after_it_settled_is_left_to_settle_again() -> None:
    """The entry the scan saw, but grown or touched since it settled, is not taken: it
    stays in the inbox, named, and the next scan settles it again."""
    outcome = at_claim(
        item_kind="file", shown="/in/rec.wav", found=F.FILE, seen=True, unchanged=False
    )
    assert outcome is not None and (outcome.kind, outcome.code) == ("gone", "gone")
    assert (
        outcome.message == "/in/rec.wav changed after it settled; left in the inbox to settle again"
    )


def test_claim_verdict_messages_name_the_input() -> None:
    """Each refusal to claim names the input's path and why it is left alone."""
    shown = "/in/rec.wav"
    gone = at_claim(item_kind="file", shown=shown, found=None, seen=False)
    other = at_claim(item_kind="file", shown=shown, found=F.HARDLINK, seen=True)
    replaced = at_claim(item_kind="file", shown=shown, found=F.FILE, seen=False)
    assert gone is not None and gone.message == f"{shown} vanished before it was claimed"
    assert other is not None and other.message == f"{shown} is no longer a plain input"
    assert replaced is not None and "not the entry the scan saw (replaced)" in replaced.message


@pytest.mark.parametrize(("same", "kind"), [(True, None), (False, OutcomeKind.CHANGED)])
def test_after_take_verdicts(same: bool, kind: OutcomeKind | None) -> None:
    """An entry swapped in between the check and the move is put back, never deposited."""
    outcome = after_take(shown="/in/rec.wav", same_entry=same)
    assert (outcome and outcome.kind) == kind


@pytest.mark.parametrize(("same", "kind"), [(True, None), (False, OutcomeKind.CHANGED)])
def test_sidecar_at_claim_verdicts(same: bool, kind: OutcomeKind | None) -> None:
    """A sidecar changed since it settled sends its input back to settle again."""
    outcome = sidecar_at_claim(shown="/in/rec.wav.nbank.yaml", same=same)
    assert (outcome and outcome.kind) == kind
    assert outcome is None or "/in/rec.wav.nbank.yaml changed after it settled" in outcome.message


@pytest.mark.parametrize(("seen", "kind"), [(True, None), (False, OutcomeKind.CHANGED)])
def test_replay_verdicts(seen: bool, kind: OutcomeKind | None) -> None:
    """A replayed claim that finds another entry in the work folder gives it back."""
    outcome = at_replay(seen=seen)
    assert (outcome and outcome.kind) == kind


CLAIMED = [
    # (case, item kind, kind found in the work folder, size, code or None)
    ("a file", "file", F.FILE, 10, None),
    ("a file linked since the claim", "file", F.HARDLINK, 10, None),
    ("a folder", "dir", F.DIRECTORY, 0, None),
    ("an empty file", "file", F.FILE, 0, "empty"),
    ("a link swapped in", "file", F.SYMLINK, 10, "unsupported"),
    ("a device swapped in", "file", F.DEVICE, 0, "unsupported"),
    ("a file where a folder was", "dir", F.FILE, 10, "unsupported"),
    ("a folder where a file was", "file", F.DIRECTORY, 10, "unsupported"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "item_kind", "found", "size", "code"), CLAIMED, ids=[c[0] for c in CLAIMED]
)
def test_when_claimed_verdicts(
    case: str, item_kind: str, found: FileKind, size: int, code: str | None
) -> None:
    """What was claimed is deposited only if a regular file with bytes, or a folder."""
    outcome = when_claimed(item_kind=item_kind, relpath="rec.wav", found=found, size=size)
    assert (outcome and outcome.code) == code
    assert outcome is None or outcome.kind is OutcomeKind.PERMANENT


def test_unsafe_claimed_keeps_the_journaled_reason() -> None:
    """An unsafe entry is rejected with the scan's reason, or a generic one without it."""
    told = unsafe_claimed({"code": "symlink", "message": "a link", "hint": "replace it"})
    plain = unsafe_claimed({})
    assert (told.kind, told.code, told.message, told.hint) == (
        OutcomeKind.PERMANENT, "symlink", "a link", "replace it"
    )  # fmt: skip
    assert (plain.code, plain.message, plain.hint) == ("unsupported", "not a regular file", "")


# -- read-back ------------------------------------------------------------------------

STAGED_BASE = Staged(
    shown="/arch/staging/.nbankd-t-i",
    relpath="rec.wav",
    staged_exists=True,
    target_exists=False,
    staged_ours=True,
    verify=True,
)
BEFORE_PUBLISH = [
    # (case, facts, code of the outcome or None to publish, read back first)
    ("ours, verify on", {}, None, True),
    ("ours, verify off", dict(verify=False), None, False),
    ("published already (replay)", dict(target_exists=True), None, False),
    ("published already, staged gone", dict(staged_exists=False, target_exists=True,
     staged_ours=False), None, False),
    ("staged copy gone", dict(staged_exists=False, staged_ours=False), "restage", False),
    ("staged copy replaced", dict(staged_ours=False), "staged-changed", True),
    ("staged copy replaced, published", dict(staged_ours=False, target_exists=True),
     "staged-changed", False),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "facts", "code", "reads"), BEFORE_PUBLISH, ids=[c[0] for c in BEFORE_PUBLISH]
)
def test_before_publish_verdicts(
    case: str, facts: dict[str, object], code: str | None, reads: bool
) -> None:
    """A staged copy gone or not ours is made again; a good one is read back if verify is on."""
    f = Staged(**{**STAGED_BASE.__dict__, **facts})  # type: ignore[arg-type]
    outcome = before_publish(f)
    assert (outcome and outcome.code) == code
    assert outcome is None or outcome.kind is OutcomeKind.RESTAGE
    assert reads_staged(f) is reads


VERIFY_READS = [
    # (already, verify, read back and matched before publish, what is read)
    (False, True, False, ReadBack.PUBLISHED),
    (False, True, True, None),
    (False, False, False, None),
    (True, False, False, ReadBack.FOUND),
    (True, True, True, ReadBack.FOUND),
]


@pytest.mark.parametrize(("already", "verify", "before", "where"), VERIFY_READS)
def test_verify_reads(already: bool, verify: bool, before: bool, where: ReadBack | None) -> None:
    """Verify reads back a copy found stored always, a published copy once, if verify is on."""
    assert verify_reads(already=already, verify=verify, verified_before_publish=before) is where


AFTER_READ_BACK = [
    # (case, where, matches, placement, outcome kind, code, discard, not already, mark)
    ("staged copy matches", ReadBack.STAGED, True, "copy", "ok", "", False, False, True),
    ("staged copy differs", ReadBack.STAGED, False, "copy", "restage", "verify-failed", True,
     False, False),
    ("published copy matches", ReadBack.PUBLISHED, True, "copy", "ok", "", False, False, False),
    ("published copy differs", ReadBack.PUBLISHED, False, "copy", "restage", "verify-failed",
     True, False, False),
    ("renamed input differs", ReadBack.PUBLISHED, False, "rename", "transient",
     "verify-failed", False, False, False),
    ("found copy matches", ReadBack.FOUND, True, "copy", "ok", "", False, False, False),
    ("found copy changed", ReadBack.FOUND, False, "copy", "restage", "verify-failed", False,
     True, False),
    ("found copy changed, renamed", ReadBack.FOUND, False, "rename", "restage",
     "verify-failed", False, True, False),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "where", "matches", "placement", "kind", "code", "discard", "unset", "mark"),
    AFTER_READ_BACK,
    ids=[c[0] for c in AFTER_READ_BACK],
)
def test_after_read_back_verdicts(
    case: str,
    where: ReadBack,
    matches: bool,
    placement: str,
    kind: str,
    code: str,
    discard: bool,
    unset: bool,
    mark: bool,
) -> None:
    """A mismatched copy is made again (the input itself, placed by rename, is kept)."""
    after = after_read_back(
        where, matches=matches, placement=placement, shown="x", staged_identity=True
    )
    assert (after.outcome.kind, after.outcome.code) == (kind, code)
    assert (after.discard, after.not_already, after.mark_verified) == (discard, unset, mark)


def test_staged_copy_without_journaled_identity_is_not_marked() -> None:
    """A staged copy of an older journal (no identity) is never marked as read back."""
    after = after_read_back(ReadBack.STAGED, matches=True, placement="copy", shown="rec.wav")
    assert after.outcome.kind is OutcomeKind.OK and not after.mark_verified


def test_read_back_messages_name_what_was_read() -> None:
    """Each failed read-back names the input, the identifier or the stored file."""
    staged = after_read_back(ReadBack.STAGED, matches=False, placement="copy", shown="a/rec.wav")
    found = after_read_back(ReadBack.FOUND, matches=False, placement="copy", shown="rec")
    stored = "/arch/resources/re/rec.wav"
    published = after_read_back(ReadBack.PUBLISHED, matches=False, placement="copy", shown=stored)
    renamed = after_read_back(ReadBack.PUBLISHED, matches=False, placement="rename", shown=stored)
    assert staged.outcome.message.startswith("the staged copy of 'a/rec.wav', read back")
    assert found.outcome.message.startswith("the stored copy of rec changed since it was found")
    assert published.outcome.message == f"{stored} did not match its sha1; copying again"
    assert renamed.outcome.message == f"{stored} does not match its sha1"

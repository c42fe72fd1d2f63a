"""The read-back verdicts, each a pure function of what a step observed: which copy
is read back from storage (the staged copy before it is published, the published
copy, or a copy found stored for the identifier), and what a missing, replaced or
mismatched copy means (the step's :class:`~nbankd.deposit.lifecycle.Outcome`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from nbankd.deposit.lifecycle import READ_BACK_FAILED, Outcome


class ReadBack(enum.StrEnum):
    """Which copy is read back from storage and compared with the input's SHA-1."""

    STAGED = "staged"  # the staged copy, before publishing makes it visible
    PUBLISHED = "published"  # the copy in resources/, by the verify step
    FOUND = "found"  # a copy stored for the identifier before this input (``already``)


@dataclass(frozen=True)
class Staged:
    """What publishing a staged copy found in ``staging/`` and at the target."""

    shown: str  # the staged copy's path, as shown
    relpath: str  # the input's relative path, as shown
    staged_exists: bool
    target_exists: bool
    staged_ours: bool  # the staged copy is the one journaled (meaningful if it exists)
    verify: bool  # the verify setting fixed at claim


def before_publish(f: Staged) -> Outcome | None:
    """A staged copy about to be published: gone (and not published either) or not the
    copy this process journaled, it is made again. None: publish it."""
    if not f.staged_exists and not f.target_exists:
        return Outcome("restage", "restage", "the staged copy is gone")
    if f.staged_exists and not f.staged_ours:
        return Outcome(
            "restage",
            "staged-changed",
            f"{f.shown} is not the staged copy nbankd wrote for {f.relpath!r}; copying again",
        )
    return None


def reads_staged(f: Staged) -> bool:
    """True when the staged copy is read back before it is published: verify is on and
    it is not published yet (a bad copy is never published, only made again)."""
    return f.verify and f.staged_exists and not f.target_exists


def verify_reads(*, already: bool, verify: bool, verified_before_publish: bool) -> ReadBack | None:
    """Which copy the verify step reads back: the copy found stored for an input that is
    ``already`` deposited (always: the input goes only once it is read back), else the
    published copy when verify is on and that inode was not already read back and
    matched before it was published. None: nothing to read."""
    if already:
        return ReadBack.FOUND
    if verify and not verified_before_publish:
        return ReadBack.PUBLISHED
    return None


@dataclass(frozen=True)
class AfterReadBack:
    """What a read-back decides: the step's outcome and what to do with the copy."""

    outcome: Outcome
    discard: bool = False  # remove the copy read (it is made again)
    not_already: bool = False  # the found copy no longer serves: deposit this input
    mark_verified: bool = False  # journal that the staged copy matched (no second read)


def after_read_back(
    where: ReadBack, *, matches: bool, placement: str, shown: str, staged_identity: bool = False
) -> AfterReadBack:
    """The verdict on a copy read back from storage. ``shown`` names what was read: the
    input's relative path (STAGED), the identifier (FOUND), the target (PUBLISHED);
    ``staged_identity``: a staged copy's identity was journaled (it can be marked)."""
    if matches:
        return AfterReadBack(
            Outcome.ok(), mark_verified=where is ReadBack.STAGED and staged_identity
        )
    if where is ReadBack.STAGED:
        message = (
            f"the staged copy of {shown!r}, read back from storage, does not match its "
            "SHA-1; copying again"
        )
        return AfterReadBack(Outcome("restage", READ_BACK_FAILED, message), discard=True)
    if where is ReadBack.FOUND:
        message = (
            f"the stored copy of {shown} changed since it was found; depositing this input again"
        )
        return AfterReadBack(Outcome("restage", READ_BACK_FAILED, message), not_already=True)
    if placement == "rename":  # the only copy: kept, and read again later
        return AfterReadBack(
            Outcome("transient", READ_BACK_FAILED, f"{shown} does not match its sha1")
        )
    message = f"{shown} did not match its sha1; copying again"
    return AfterReadBack(Outcome("restage", READ_BACK_FAILED, message), discard=True)


__all__ = [
    "AfterReadBack",
    "ReadBack",
    "Staged",
    "after_read_back",
    "before_publish",
    "reads_staged",
    "verify_reads",
]

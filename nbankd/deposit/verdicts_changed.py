"""The verdicts on an input written to after it settled (a program kept it open, or
wrote it again), each a pure function of what a step observed returning the step's
:class:`~nbankd.deposit.lifecycle.Outcome`: found still open for writing when staged,
changed once its copy was deposited, or changed, written to or held open for writing
before an input placed by rename is published.
"""

from __future__ import annotations

from nbankd.deposit.lifecycle import Outcome


def still_open_for_writing(shown: str) -> Outcome:
    """A claimed file some program still holds open for writing (quiet for longer than
    the settle time, not finished): it goes back to the inbox, never copied yet."""
    return Outcome(
        "changed",
        "open-for-writing",
        f"{shown} is still open for writing by a program; it goes back to the inbox and "
        "is deposited once it is closed",
        "nothing to do if a program is still recording it",
    )


def changed_after_deposit(shown: str, identifier: str | None) -> Outcome:
    """At release, the claimed input is no longer what was claimed (a writer kept it
    open): it is put back whole, never removed; the archive keeps the claimed copy."""
    return Outcome(
        "changed",
        "changed",
        f"{shown} changed after its copy was deposited as {identifier}: the archive keeps "
        "the bytes it had when claimed, and this version is back in the inbox",
        "a program may still be writing it: let it finish; to deposit this version too, "
        "give it another name",
    )


def changed_before_publish(shown: str, identifier: str | None, sha1: str | None) -> Outcome:
    """Placed by rename, the input no longer has the content hashed and registered: it
    is not published (the archive never holds other bytes than the record's), kept in
    the work folder and tried again."""
    return Outcome(
        "changed",
        "changed",
        f"{shown} changed after it was registered as {identifier} (sha1 {sha1}): it is not "
        "published, and stays in the inbox's work folder",
        f"a program may still be writing it. The record {identifier} names bytes this "
        "file no longer holds; the file is kept, never published with other bytes: have "
        "a registry administrator decide about that record",
    )


def withdrawn_before_publish(
    shown: str, identifier: str | None, sha1: str | None, archive: str
) -> Outcome:
    """Placed by rename, the input no longer has the content registered: never
    published, it goes back where it was (an inbox deposits it again once it
    settles); the record is left as it is."""
    return Outcome(
        "withdrawn",
        "changed",
        f"{shown} changed after it was registered as {identifier} (sha1 {sha1}): it is not "
        "deposited, and the file is back where it was",
        "a program may still have been writing it: once it is finished, it is deposited "
        f"again from an inbox (or with nbankctl deposit). The record {identifier} names "
        f"bytes archive {archive!r} does not hold: unless another input serves it, the "
        "audit reports it missing, and a registry administrator may delete it",
    )


def written_while_rehashed(shown: str, identifier: str | None) -> Outcome:
    """Placed by rename, the input changed while it was hashed again before publishing:
    judged again at the next attempt (transient)."""
    return Outcome(
        "transient",
        "changed",
        f"{shown} changed while it was read again before its publishing as {identifier}; "
        "it is judged again at the next attempt",
        "a program may still be writing it",
    )


def held_at_publish(shown: str, identifier: str | None) -> Outcome:
    """Placed by rename, the input (a file of it) is held open for writing by a program
    at publishing: not published while it is (transient)."""
    return Outcome(
        "transient",
        "changed",
        f"{shown} (registered as {identifier}) is held open for writing by a program: it "
        "waits in the inbox's work folder and is published once it is closed, or goes "
        "back into the inbox if its bytes change",
        "nothing to do if a program is still recording it",
    )


def rewritten_same_bytes(shown: str, identifier: str | None) -> Outcome:
    """Placed by rename, the input was written to after registering, its bytes the same,
    and whether a program still holds it cannot be told: published if it stays
    unchanged until the next attempt (transient)."""
    return Outcome(
        "transient",
        "changed",
        f"{shown} was written to after it was registered as {identifier} (its bytes the "
        "same): it is published if it stays unchanged until the next attempt",
        "nothing to do if a program is still recording it",
    )


__all__ = [
    "changed_after_deposit",
    "changed_before_publish",
    "held_at_publish",
    "rewritten_same_bytes",
    "still_open_for_writing",
    "withdrawn_before_publish",
    "written_while_rehashed",
]

"""What an input's identifier may become, decided from facts: pure, tested by tables.

Two inputs may meet one identifier: the same file dropped twice, ``b.wav`` and
``b.bin`` with the same bytes, another file with the same name, a lost registry
answer. The rule (SPEC, guarantee 3) is the same on every path that can find it
(lookup, register, publish):

- same identifier, bytes and stored name: an idempotent success marked
  ``already-deposited`` (once the stored copy has been read back and matches);
- same identifier and bytes under another stored name: ``duplicate``, naming the
  stored file; same identifier and other bytes: ``name-taken``, naming the record
  or the stored file;
- another identifier with the same bytes: ``duplicate``, naming that identifier;
- an automatic identifier found taken is replaced by a new one, never rejected;
- exactly one stored file per identifier.

The steps gather :class:`Facts` (registry answers, stored entries, the SHA-1 of a
stored copy when one has to be compared) and act on the :class:`Verdict`.

Two more verdicts live here, each a function of what a step observed (no I/O, no
clock), returning the step's :class:`~nbankd.deposit.lifecycle.Outcome` or None
when the step goes on:

- **claim**: may the entry the scan saw be taken into the work folder (its kind, as
  :class:`~nbankd.filekind.FileKind` classifies it, and its identity), and is the
  claimed input something nbankd deposits (a regular file or a folder, not empty);
- **read-back**: which copy is read back from storage (the staged copy before it is
  published, the published copy, or a copy found stored for the identifier), and
  what a missing, replaced or mismatched copy means.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from nbankd.deposit.lifecycle import READ_BACK_FAILED, Outcome
from nbankd.filekind import FileKind


class Kind(enum.StrEnum):
    PROCEED = "proceed"  # deposit it
    ALREADY = "already"  # stored and registered already with these bytes and name
    RENAME = "rename"  # an automatic identifier that is taken: choose another
    REJECT = "reject"  # the input cannot take this identifier
    SUPERSEDED = "superseded"  # rejected although registered: a stored copy serves the record
    RECHECK = "recheck"  # another input is depositing these bytes under this identifier


@dataclass(frozen=True)
class Facts:
    """What the registry and the archive say about an input's identifier."""

    name: str
    sha1: str
    target: str  # the path the input would be stored at
    auto: bool = False  # the identifier was chosen automatically
    registered: bool = False  # the registry may hold this input's own record
    holders: tuple[str, ...] = ()  # identifiers of the records with this SHA-1
    record_sha1: str | None = None  # the SHA-1 of the record named ``name``
    has_record: bool = False  # a record named ``name`` exists
    record_matches: bool = True  # that record has the input's datatype and metadata
    stored: tuple[str, ...] = ()  # paths stored for ``name``, ``target`` first if there
    stored_sha1: str | None = None  # SHA-1 of ``stored[0]`` when it was read
    holder_stored: bool = True  # this archive stores an entry for the first other holder


@dataclass(frozen=True)
class Verdict:
    kind: Kind
    code: str = ""
    message: str = ""
    hint: str = ""


PROCEED = Verdict(Kind.PROCEED)
_CHECK = "see 'nbankctl locate {name}'; delete this copy once you have checked it"
_RENAME = "rename the file, give an 'id' in a sidecar, or use auto_id"


def needs_stored_sha1(f: Facts) -> bool:
    """True when the verdict depends on the bytes of the stored entry ``stored[0]``:
    the registry holds this identifier with these bytes and a file is stored for it."""
    return bool(f.stored) and f.has_record and f.record_sha1 == f.sha1


def at_lookup(f: Facts) -> Verdict:
    """Before registering: may the input be deposited under its identifier?"""
    others = [h for h in f.holders if h != f.name]
    if others and not f.registered:
        return _registered_as(others[0], f.holder_stored)
    if f.has_record and f.record_sha1 != f.sha1:
        if f.auto and not f.registered:
            return Verdict(Kind.RENAME, "auto-id-taken", f"identifier {f.name} is taken")
        where = f" (stored as {f.stored[0]})" if f.stored else ""
        return Verdict(
            Kind.REJECT,
            "name-taken",
            f"identifier {f.name} is already registered for other content{where}",
            _RENAME,
        )
    if f.stored:
        return _stored(f)
    if f.has_record and not f.record_matches and not f.registered:
        return _busy(f)
    return PROCEED


def _registered_as(holder: str, stored: bool) -> Verdict:
    """The registry holds the input's bytes as ``holder``; ``stored``: this archive
    stores an entry for it. Without one, this input may be the only copy of that
    record's bytes (its file lost, or never filed): never advised to be deleted."""
    if stored:
        return Verdict(
            Kind.REJECT,
            "duplicate",
            f"the same content is already registered as {holder}",
            "nothing to deposit: " + _CHECK.format(name=holder),
        )
    return Verdict(
        Kind.REJECT,
        "duplicate",
        f"the same content is already registered as {holder}, but this archive stores no "
        f"copy of {holder}: this input may be the only copy of those bytes",
        f"keep this file; see 'nbankctl locate {holder}' for where its copies should be, "
        "and run nbankctl audit",
    )


def _busy(f: Facts) -> Verdict:
    """The record has these bytes but another input's description: that input is
    being deposited; this one is judged again once it is stored."""
    return Verdict(
        Kind.RECHECK,
        "identifier-busy",
        f"identifier {f.name} is registered with these bytes for another input (its "
        "datatype or metadata differ); looking again once that input is stored",
        f"nothing to do if the other input is on its way; else see 'nbankctl locate {f.name}'",
    )


#: the code of an input whose registration found its bytes registered under another
#: identifier while the registry's write lock was held (:func:`held_elsewhere`)
SHA1_HELD = "sha1-held"


def held_elsewhere(name: str) -> Verdict:
    """Registering ``name`` (inside a batch holding the registry's write lock) found its
    bytes registered under another identifier. Whether this archive stores that record
    (which decides whether the input may be the only copy of those bytes) needs a look
    into the archive, never made while the lock is held: the lookup judges it."""
    return Verdict(
        Kind.RECHECK,
        SHA1_HELD,
        f"the bytes of {name} are registered under another identifier; judged by a "
        "lookup once the registry's write lock is released",
    )


#: the codes of the RECHECK verdicts: waits on another input of the same bytes (its
#: registration or storing), which end by themselves once that input moves on
RECHECK_CODES = frozenset({"identifier-busy", SHA1_HELD})


def _stored(f: Facts) -> Verdict:
    """An entry is stored for the identifier: judged by the record and its bytes."""
    stored = f.stored[0]
    if not f.has_record:
        if f.auto and not f.registered:
            return Verdict(Kind.RENAME, "auto-id-taken", f"{stored} is in the archive")
        return Verdict(
            Kind.REJECT,
            "stored-elsewhere",
            f"{stored} is already in the archive but not registered",
            "run nbankctl audit; " + _RENAME,
        )
    if f.stored_sha1 != f.sha1:
        # the registry has these bytes under this identifier, the archive other bytes:
        # the stored copy is damaged or replaced, and this input may be the good copy
        return Verdict(
            Kind.REJECT,
            "stored-damaged",
            f"identifier {f.name} is registered with this content, but {stored} holds "
            f"other bytes (sha1 {f.stored_sha1})",
            "the stored copy is damaged: run nbankctl audit; this input is a good copy, "
            "kept in the rejected folder",
        )
    if stored == f.target:
        return Verdict(Kind.ALREADY, "already-deposited", f"already stored as {stored}")
    return _same_bytes_stored(f, stored)


def _same_bytes_stored(f: Facts, stored: str) -> Verdict:
    """The identifier is stored as ``stored`` (another name) with the input's bytes:
    a duplicate, rejected even when registered (that copy serves the record)."""
    return Verdict(
        Kind.SUPERSEDED if f.registered else Kind.REJECT,
        "duplicate",
        f"identifier {f.name} is already stored with the same content as {stored}",
        "nothing to deposit: " + _CHECK.format(name=f.name),
    )


def at_register(f: Facts) -> Verdict:
    """The registry refused the record (name or SHA-1 taken): ours already, or not?

    ``has_record``/``record_sha1`` describe the record named ``name`` after the
    refusal, ``holders`` the records with the input's SHA-1.
    """
    if f.has_record and f.record_sha1 == f.sha1:
        if f.record_matches or f.registered:
            return PROCEED  # ours, from an earlier attempt whose answer was lost
        return _busy(f)  # another input's record for the same bytes
    if f.has_record:
        if f.auto and not f.registered:
            return Verdict(Kind.RENAME, "auto-id-taken", f"identifier {f.name} is taken")
        return Verdict(
            Kind.REJECT,
            "name-taken",
            f"identifier {f.name} is already registered for other content",
            _RENAME,
        )
    others = [h for h in f.holders if h != f.name]
    if others:
        return _registered_as(others[0], f.holder_stored)
    return Verdict(
        Kind.REJECT,
        "duplicate",
        "the same content is already registered under another identifier",
        f"find it with 'nbankctl search --hash {f.sha1}' before deleting this file",
    )


def at_publish(f: Facts) -> Verdict:
    """Publishing found ``stored[0]`` already filed for the identifier under another
    name; ``stored_sha1`` is its SHA-1."""
    stored = f.stored[0]
    if f.stored_sha1 == f.sha1:
        return _same_bytes_stored(f, stored)
    return Verdict(
        Kind.REJECT,
        "name-taken",
        f"identifier {f.name} is already stored as {stored} with other content",
        "run nbankctl audit" if f.registered else _RENAME,
    )


# -- claim -------------------------------------------------------------------------


def reconfigured(*, shown: str, what: str) -> Outcome:
    """Before the input is taken: its inbox's configuration no longer decides what was
    journaled with it (``what``: archive, directories or ready mode): it
    is left in the inbox, untouched, and decided again under the configuration now,
    never deposited under a mix of two."""
    return Outcome(
        "gone",
        "reconfigured",
        f"{shown}: its inbox's {what} changed in the configuration since it settled; "
        "left in the inbox to be decided again under the new configuration",
    )


def at_claim(
    *, item_kind: str, shown: str, found: FileKind | None, seen: bool, unchanged: bool = True
) -> Outcome | None:
    """Before the input is taken: ``found`` is the kind of the entry at its path now
    (None: nothing there), ``seen`` whether it is the entry the scan saw, ``unchanged``
    whether it still has the size and times it settled with. None: take it.

    A ``file`` item must still be a regular file with one name, a ``dir`` item a
    folder; an ``unsafe`` item (a link, FIFO...) is moved by name whatever it is."""
    if found is None:
        return Outcome("gone", "gone", f"{shown} vanished before it was claimed")
    wanted = FileKind.DIRECTORY if item_kind == "dir" else FileKind.FILE
    if item_kind != "unsafe" and found is not wanted:
        return Outcome("gone", "unsupported", f"{shown} is no longer a plain input")
    if not seen:
        return Outcome(
            "gone", "gone", f"{shown} is not the entry the scan saw (replaced); left alone"
        )
    if not unchanged:  # written to since it settled: the next scan settles it again
        return Outcome(
            "gone", "gone", f"{shown} changed after it settled; left in the inbox to settle again"
        )
    return None


def sidecar_at_claim(*, shown: str, same: bool) -> Outcome | None:
    """The input is in the work folder; ``same`` is False when its sidecar is no longer
    the one the scan saw settle (rewritten, replaced or removed since): the input goes
    back to the inbox and settles again with whatever sidecar it has then, never
    deposited with a sidecar half written. None: take the sidecar."""
    if same:
        return None
    return Outcome(
        "changed",
        "sidecar-changed",
        f"sidecar {shown} changed after it settled; the input goes back to the inbox and "
        "is deposited once its sidecar stays unchanged",
        "nothing to do if the sidecar is still being written",
    )


def sidecar_came(*, shown: str) -> Outcome:
    """Before the take: a sidecar of the input appeared (or a second one) since its
    intent was journaled. The input is left in the inbox (nothing taken) and settles
    again with it, never deposited while its metadata is left behind."""
    return Outcome(
        "gone",
        "gone",
        f"{shown} was given a sidecar after it settled; left in the inbox to settle again with it",
    )


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


def after_take(*, shown: str, same_entry: bool) -> Outcome | None:
    """Just after the move: ``same_entry`` is False when the entry now in the work folder
    is not the one checked (swapped in between): the put-back step returns it."""
    if same_entry:
        return None
    return Outcome("changed", "changed", f"{shown} changed while it was claimed; putting it back")


def at_replay(*, seen: bool) -> Outcome | None:
    """A claim replayed after a crash found the input in the work folder already:
    ``seen`` is False when it is not the entry the scan saw (it is given back)."""
    if seen:
        return None
    return Outcome("changed", "changed", "not the entry the scan saw; putting it back")


def when_claimed(*, item_kind: str, relpath: str, found: FileKind, size: int) -> Outcome | None:
    """The claimed input, by the kind ``found`` in the work folder and its ``size``:
    a link, FIFO or device swapped in before the move is never read; a file with zero
    bytes is rejected. (Another name made for the file since the claim does not
    matter any more: it is read through the work folder's name.) None: deposit it."""
    ok = (
        found is FileKind.DIRECTORY
        if item_kind == "dir"
        else found in (FileKind.FILE, FileKind.HARDLINK)
    )
    if not ok:
        return Outcome("permanent", "unsupported", "not a regular file when claimed")
    if item_kind != "dir" and size == 0:
        return Outcome(
            "permanent",
            "empty",
            f"{relpath!r} has zero bytes",
            "an empty recording is almost always a failed acquisition; "
            "check the rig and requeue if it is meant to be empty",
        )
    return None


def unsafe_claimed(reason: dict[str, str]) -> Outcome:
    """A claimed ``unsafe`` item (a symlink, hard link, FIFO, socket or device, moved by
    name and never opened) is rejected with the reason the scan journaled."""
    return Outcome(
        "permanent",
        reason.get("code", "unsupported"),
        reason.get("message", "not a regular file"),
        reason.get("hint", ""),
    )


# -- read-back ---------------------------------------------------------------------


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
    "PROCEED",
    "AfterReadBack",
    "Facts",
    "Kind",
    "ReadBack",
    "Staged",
    "Verdict",
    "after_read_back",
    "after_take",
    "at_claim",
    "at_lookup",
    "at_publish",
    "at_register",
    "at_replay",
    "before_publish",
    "needs_stored_sha1",
    "reads_staged",
    "unsafe_claimed",
    "verify_reads",
    "when_claimed",
]

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

The verdicts of the other steps, each a function of what a step observed (no I/O,
no clock) returning the step's :class:`~nbankd.deposit.lifecycle.Outcome` or None
when the step goes on, are grouped by what they judge:
:mod:`nbankd.deposit.verdicts_claim` (may the entry be taken, and is what was taken
deposited), :mod:`nbankd.deposit.verdicts_changed` (an input written to after it
settled) and :mod:`nbankd.deposit.verdicts_readback` (which copy is read back from
storage, and what a mismatch means).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


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


__all__ = [
    "PROCEED",
    "RECHECK_CODES",
    "SHA1_HELD",
    "Facts",
    "Kind",
    "Verdict",
    "at_lookup",
    "at_publish",
    "at_register",
    "held_elsewhere",
    "needs_stored_sha1",
]

"""The claim step's verdicts, each a function of what the claim observed (no I/O, no
clock), returning the step's :class:`~nbankd.deposit.lifecycle.Outcome` or None when
the claim goes on: may the entry the scan saw be taken into the work folder (its kind,
as :class:`~nbankd.filekind.FileKind` classifies it, its identity, its sidecar, the
configuration it was journaled under), and is the claimed input something nbankd
deposits (a regular file or a folder, not empty).
"""

from __future__ import annotations

from nbankd.deposit.lifecycle import Outcome
from nbankd.filekind import FileKind


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


__all__ = [
    "after_take",
    "at_claim",
    "at_replay",
    "reconfigured",
    "sidecar_at_claim",
    "sidecar_came",
    "unsafe_claimed",
    "when_claimed",
]

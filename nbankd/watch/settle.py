"""When is a file finished? Pure functions over small frozen records.

Nothing here does I/O or reads a clock: the caller passes ``now`` (use
:func:`time.monotonic`; only differences between ``now`` values are used, so the
wall clock, NFS clock skew and file timestamps never matter).

Rules (SPEC §3 guarantee 5, §4 ``settle_seconds``, ``ready``, ``stall_after``):

- An entry is *settled* when its :class:`~nbankd.watch.identity.Identity` (device,
  inode, size, mtime, ctime, and for directory resources the whole tree) has been
  the same at every observation for at least ``settle_seconds``. The clock starts
  when the entry is first seen, so after a restart every file waits one settle
  period again: file timestamps are not trusted to shortcut it.
- ``ready: settle``: settled means ``READY``. ``ready: marker``: ``READY`` needs the
  ``NAME.done`` marker too; a settled file without it is ``WAITING_FOR_MARKER``.
- ``STALLED``: not settled, seen changing at least once, and the current period of
  change began ``stall_after`` or more ago (for a new file, when it was first seen).
  A stalled entry becomes ``READY`` as soon as it settles.
- Zero-byte files follow the same rules (they are often still being created); once
  ready, the pipeline rejects them with code ``empty``.
- An input whose sidecar (``NAME.nbank.yaml|json``) is still changing is held back
  until the sidecar has settled too.

:func:`step` folds one whole scan into a :class:`TrackerState`; :func:`next_deadline`
says when the daemon should look again.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from nbankd.names import MARKER_SUFFIX
from nbankd.timefmt import human_duration
from nbankd.watch.identity import Identity, Interner
from nbankd.watch.scan import Entry, EntryKind


class ReadyMode(enum.StrEnum):
    """The inbox option ``ready``."""

    SETTLE = "settle"
    MARKER = "marker"


class State(enum.Enum):
    SETTLING = "settling"
    READY = "ready"
    WAITING_FOR_MARKER = "waiting-for-marker"
    STALLED = "stalled"


@dataclass(frozen=True, slots=True)
class Verdict:
    """An entry's state after an observation, with the sentence ``explain`` shows.

    ``seconds_left`` is how long the entry must stay unchanged to settle (0 unless
    ``SETTLING`` or ``STALLED``).
    """

    state: State
    reason: str
    seconds_left: float = 0.0

    @property
    def ready(self) -> bool:
        return self.state is State.READY


@dataclass(frozen=True, slots=True)
class Watch:
    """What is remembered about one path between scans.

    ``changing_since`` starts the current period of change (for stall detection);
    ``changes`` counts identity changes seen in that period. ``ready_at`` is when
    the entry settles if it stays unchanged (None once settled); ``stall_at`` when
    it would be reported stalled (None when it cannot stall).
    """

    identity: Identity
    first_seen: float
    last_change: float
    changing_since: float
    changes: int
    verdict: Verdict
    ready_at: float | None
    stall_at: float | None


@dataclass(frozen=True, slots=True)
class SettlePolicy:
    """An inbox's settle options, in seconds (``stall_after=None``: never stalls)."""

    settle_seconds: float = 10.0
    stall_after: float | None = 3600.0
    ready_mode: ReadyMode = ReadyMode.SETTLE

    def __post_init__(self) -> None:
        if not (self.settle_seconds >= 0 and math.isfinite(self.settle_seconds)):
            raise ValueError(f"settle_seconds must be a finite number >= 0: {self.settle_seconds}")
        if self.stall_after is not None and not self.stall_after > 0:
            raise ValueError(f"stall_after must be > 0 or None: {self.stall_after}")


def observe(
    prev: Watch | None,
    identity: Identity,
    now: float,
    *,
    settle_seconds: float,
    stall_after: float | None,
    ready_mode: ReadyMode | str = ReadyMode.SETTLE,
    marker_present: bool = False,
    marker_name: str | None = None,
) -> Watch:
    """Folds one observation of an entry into its watch and decides its verdict.

    ``prev`` is the watch from the previous scan (None the first time). A ``now``
    earlier than the previous observation is treated as no time passing.
    ``marker_name`` only improves the reason text.
    """
    mode = ReadyMode(ready_mode)
    if prev is None:
        first_seen = last_change = changing_since = now
        changes = 0
    else:
        first_seen = prev.first_seen
        now = max(now, prev.last_change)
        if identity == prev.identity:
            identity = prev.identity  # one object per file across scans, not one per scan
            last_change, changing_since, changes = (
                prev.last_change,
                prev.changing_since,
                prev.changes,
            )
        else:
            was_settled = prev.ready_at is None
            last_change = now
            changing_since = now if was_settled else prev.changing_since
            changes = 1 if was_settled else prev.changes + 1
    unchanged = now - last_change
    settled = now >= last_change + settle_seconds  # same sum as ready_at: exact deadlines
    ready_at = None if settled else last_change + settle_seconds
    stall_at = (
        changing_since + stall_after
        if stall_after is not None and not settled and changes > 0
        else None
    )
    marker = marker_name or "its .done marker"
    if not settled:
        left = settle_seconds - unchanged
        if stall_at is not None and now >= stall_at:
            verdict = Verdict(
                State.STALLED,
                f"stalled: still changing after {human_duration(now - changing_since)}"
                f" (stall_after {human_duration(stall_after or 0)}); last change"
                f" {human_duration(unchanged)} ago",
                left,
            )
        else:
            text = (
                f"settling: unchanged for {human_duration(unchanged)}"
                f" of {human_duration(settle_seconds)}"
            )
            if mode is ReadyMode.MARKER and not marker_present:
                text += f"; {marker} not present yet"
            verdict = Verdict(State.SETTLING, text, left)
    elif mode is ReadyMode.MARKER and not marker_present:
        verdict = Verdict(
            State.WAITING_FOR_MARKER,
            f"waiting for {marker}: settled, unchanged for {human_duration(unchanged)}",
        )
    else:
        why = " and marker present" if mode is ReadyMode.MARKER else ""
        verdict = Verdict(
            State.READY,
            f"ready: unchanged for {human_duration(unchanged)}"
            f" (settle {human_duration(settle_seconds)}){why}",
        )
    return Watch(
        identity,
        first_seen,
        last_change,
        changing_since,
        changes,
        _shared(verdict),
        ready_at,
        stall_at,
    )


#: verdicts handed out, so the thousands of files of a backlog that are ready (or first
#: seen) in one scan share one (frozen) record
_shared: Interner[Verdict] = Interner(4096)


# --- the tracker: a whole scan at a time ---------------------------------------------


@dataclass(frozen=True, slots=True)
class TrackerState:
    """Per-path watches of one inbox, keyed by relpath. Treat as immutable."""

    watches: Mapping[str, Watch] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Step:
    """What :func:`step` found.

    - ``ready``: inputs (``FILE``, ``DIRECTORY_RESOURCE``) to deposit now, with marker
      and sidecars settled. Level-triggered: an entry is listed again on every step
      while it stays ready, so the caller skips the ones it already has in hand.
      A directory resource with ``Entry.problem`` set holds members that must not be
      read (or unreadable folders): the caller rejects it rather than deposit it.
    - ``unsafe``: settled symlinks, hard links, FIFOs, sockets, devices and others,
      which are never read (guarantee 7); the caller decides (normally: reject).
    - ``stalled``: inputs still changing after ``stall_after``.
    - ``vanished``: relpaths tracked before and absent from this scan (forgotten).
    - ``problems``: ``UNREADABLE`` entries from the scan.
    - ``orphans``: sidecars and markers whose input is absent.
    - ``verdicts``: the verdict of every tracked relpath, for status and explain.
    """

    state: TrackerState
    ready: tuple[Entry, ...]
    unsafe: tuple[Entry, ...]
    stalled: tuple[Entry, ...]
    vanished: tuple[str, ...]
    problems: tuple[Entry, ...] = ()
    orphans: tuple[Entry, ...] = ()
    verdicts: Mapping[str, Verdict] = field(default_factory=dict)


def step(state: TrackerState, entries: Iterable[Entry], now: float, policy: SettlePolicy) -> Step:
    """Folds one complete scan of an inbox into ``state``.

    Inputs and unsafe entries get a watch each (unsafe ones settle too, since a
    hard link is often transient: ``link`` then ``unlink``); sidecars get a watch so
    an input waits for its sidecar to settle; markers only need to exist. Paths
    absent from ``entries`` are forgotten and listed in ``vanished``.
    """
    entries = entries if isinstance(entries, list) else list(entries)
    markers = {e.owner for e in entries if e.kind is EntryKind.MARKER}
    sidecars: dict[str, list[Entry]] = {}
    for e in entries:
        if e.kind is EntryKind.SIDECAR and e.owner is not None:
            sidecars.setdefault(e.owner, []).append(e)

    old = state.watches
    watches: dict[str, Watch] = {}
    verdicts: dict[str, Verdict] = {}
    for e in entries:
        if e.identity is None:
            continue
        if e.kind is EntryKind.SIDECAR or e.kind.is_unsafe:
            w = observe(
                old.get(e.relpath),
                e.identity,
                now,
                settle_seconds=policy.settle_seconds,
                stall_after=None,
            )
        elif e.kind.is_input:
            w = observe(
                old.get(e.relpath),
                e.identity,
                now,
                settle_seconds=policy.settle_seconds,
                stall_after=policy.stall_after,
                ready_mode=policy.ready_mode,
                marker_present=e.relpath in markers,
                marker_name=e.name + MARKER_SUFFIX,
            )
        else:
            continue
        watches[e.relpath] = w
        verdicts[e.relpath] = w.verdict

    ready: list[Entry] = []
    unsafe: list[Entry] = []
    stalled: list[Entry] = []
    for e in entries:
        w = watches.get(e.relpath)
        if w is None:
            continue
        if e.kind.is_unsafe:
            if w.verdict.ready:
                unsafe.append(e)
        elif e.kind.is_input:
            verdict = _hold_for_sidecars(w.verdict, sidecars.get(e.relpath, ()), watches, now)
            verdicts[e.relpath] = verdict
            if verdict.ready:
                ready.append(e)
            elif verdict.state is State.STALLED:
                stalled.append(e)

    companions = [e for e in entries if e.kind in (EntryKind.SIDECAR, EntryKind.MARKER)]
    if companions:  # a relpath -> entry map only when there is something to look up
        by_path = {e.relpath: e for e in entries}
        orphans = tuple(
            e for e in companions if not (e.owner in by_path and by_path[e.owner].kind.is_input)
        )
    else:
        orphans = ()
    vanished = tuple(sorted(p for p in old if p not in watches))
    return Step(
        state=TrackerState(watches),
        ready=tuple(ready),
        unsafe=tuple(unsafe),
        stalled=tuple(stalled),
        vanished=vanished,
        problems=tuple(e for e in entries if e.kind is EntryKind.UNREADABLE),
        orphans=orphans,
        verdicts=verdicts,
    )


def _hold_for_sidecars(
    verdict: Verdict, cars: Iterable[Entry], watches: Mapping[str, Watch], now: float
) -> Verdict:
    """A ready input stays SETTLING while one of its sidecars has not settled, and
    STALLED while it has two (``.nbank.yaml`` and ``.nbank.json``): which one says its
    identifier and metadata is for a person to decide, never the daemon."""
    if not verdict.ready:
        return verdict
    cars = list(cars)
    if len(cars) > 1:
        names = " and ".join(sorted(car.name for car in cars))
        return Verdict(
            State.STALLED,
            f"stalled: two sidecars, {names}; it waits until one of them is removed",
        )
    for car in cars:
        w = watches.get(car.relpath)
        if w is not None and not w.verdict.ready:
            left = w.verdict.seconds_left
            return Verdict(
                State.SETTLING,
                f"settling: sidecar {car.name} changed {human_duration(now - w.last_change)} ago",
                left,
            )
    return verdict


def next_deadline(state: TrackerState) -> float | None:
    """The earliest time at which a rescan could find something newly ready or stalled.

    None when nothing is waiting on time (everything ready, waiting for a marker, or
    nothing tracked); the daemon then sleeps until its next wake-up or rescan.
    """
    times = [
        t
        for w in state.watches.values()
        for t in (w.ready_at, w.stall_at if w.verdict.state is not State.STALLED else None)
        if t is not None
    ]
    return min(times, default=None)


def open_verdict(settle_seconds: float) -> Verdict:
    """The verdict of a file held back because a program still has it open for writing."""
    text = (
        "open for writing by a program: waits until it is closed (asked again every "
        f"{human_duration(settle_seconds)})"
    )
    return _shared(Verdict(State.SETTLING, text, settle_seconds))


def hold_open(
    state: TrackerState, relpaths: Iterable[str], now: float, settle_seconds: float
) -> TrackerState:
    """The state with ``relpaths`` (ready, but still open for writing by a program)
    settling again from ``now``: asked again once they stay unchanged that long, and
    their verdict says why they wait. Not a change: they never count as stalled."""
    watches = dict(state.watches)
    verdict = open_verdict(settle_seconds)
    for path in relpaths:
        w = watches.get(path)
        if w is not None:
            watches[path] = replace(
                w,
                last_change=now,
                changing_since=now,
                changes=0,  # quiet, only held: never judged stalled for its earlier growth
                verdict=verdict,
                ready_at=now + settle_seconds,
                stall_at=None,
            )
    return replace(state, watches=watches)


def forget(state: TrackerState, relpaths: Iterable[str]) -> TrackerState:
    """The state without ``relpaths`` (e.g. after the daemon claimed them)."""
    drop = set(relpaths)
    return replace(state, watches={p: w for p, w in state.watches.items() if p not in drop})


#: :func:`sidecar_for`'s answer when the input must wait for the next scan
HOLD = "hold"


def sidecar_for(
    candidates: Iterable[tuple[str, Identity | None]], watches: Mapping[str, Watch]
) -> str | None:
    """Which sidecar an input ready at the last scan is journaled with, from what is
    at its sidecar names now (``(relpath, identity)``, None: nothing there or a folder):
    None when there is none, the relpath of the one the tracker saw settle with this
    very identity, or :data:`HOLD` when one appeared, changed or doubled since the
    scan (the input waits for the next scan, which settles it with its sidecar:
    a sidecar still being written is never taken)."""
    present = [(rel, ident) for rel, ident in candidates if ident is not None]
    if not present:
        return None
    if len(present) > 1:
        return HOLD
    [(rel, ident)] = present
    w = watches.get(rel)
    if w is None or not w.verdict.ready or not w.identity.same_file(ident):
        return HOLD
    return rel

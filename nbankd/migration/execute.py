"""Reading the target registry's state for an export, and carrying out a plan.

:func:`read_target` asks the target only what the plan needs (reads are
anonymous): its datatypes and archives, the export's resource names in bulk with
their locations, and each remaining SHA-1 by search. :func:`carry_out` creates
what the plan says, in its order, one request each; only these writes carry
credentials.

The record a creation returns is compared with the exported one: a server that
stores something else (``NBANK_METADATA_ALIASES`` moving a metadata key into
``animal``, say) gives the outcome ``altered``, reported like a conflict.

Re-running is safe at any point. When a creation finds the thing already there
(another process, or a plan made before an interrupted run finished), the target's
record is read again: the same record counts as present, anything else as a
conflict. A transient failure (registry unreachable, 5xx) or refused credentials
stop the run: run it again to continue. The fault-injection point
``migrate-after-create`` (``NBANKD_CRASH_AT=migrate-after-create:N``) kills the
process right after the N-th creation, for the tests of resuming.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from nbankd import errors, seams
from nbankd.migration.plan import (
    Kind,
    Plan,
    Step,
    TargetState,
    Verdict,
    record_differences,
)
from nbankd.migration.snapshot import Snapshot
from nbankd.registry.base import (
    ArchiveRecord,
    DataType,
    LocationRecord,
    Registry,
    ResourceRecord,
)

CRASH_POINT = "migrate-after-create"
#: outcomes after which a resource exists on the target (its locations can follow)
USABLE = ("created", "present", "altered")


@dataclass(frozen=True)
class Outcome:
    """What happened to one step: created, present, altered (created, but the registry
    stored something else than was sent), conflict, blocked or failed."""

    step: Step
    status: str
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("created", "present")  # "altered" needs a look: exit 1

    def to_json(self) -> dict[str, str]:
        return {**self.step.to_json(), "status": self.status, "message": self.message}


Report = Callable[[Outcome], None]


def read_target(target: Registry, source: Snapshot) -> TargetState:
    """The target's state as far as ``source`` is concerned (reads only)."""
    datatypes = {d.name: d for d in target.list_datatypes()}
    archives = {a.name: a for a in target.list_archives()}
    names = [r.name for r in source.resources]
    found = {r.name: r for r in target.get_resources(names)}
    known = {(a.name, a.scheme, a.root) for a in archives.values()}
    located = target.get_locations_bulk(n for n, r in found.items() if r.locations)
    locations = {
        name: tuple(
            loc for loc in locs if (loc.archive_name, loc.scheme, loc.root) in known
        )  # leaves out django-neurobank's virtual "registry" location
        for name, locs in located.items()
    }
    by_sha1: dict[str, ResourceRecord] = {}
    for r in source.resources:
        if r.name in found or not r.sha1:
            continue
        sha1 = r.sha1.lower()
        for other in target.search(sha1=sha1):
            if (other.sha1 or "").lower() == sha1:
                by_sha1[sha1] = other
    return TargetState(datatypes, archives, found, by_sha1, locations)


class _Runner:
    def __init__(
        self, target: Registry, report: Report | None, opener: Callable[[], Registry] | None
    ) -> None:
        self.main = target
        self.opener = opener
        self.report = report or (lambda _o: None)
        self.outcomes: list[Outcome] = []
        self.unusable: set[str] = set()  # resources not on the target after their step
        self._lock = threading.Lock()
        self._local = threading.local()
        self._opened: list[Registry] = []

    @property
    def target(self) -> Registry:
        """The main thread's registry, or this worker thread's own (``opener``)."""
        if threading.current_thread() is threading.main_thread() or self.opener is None:
            return self.main
        mine: Registry | None = getattr(self._local, "target", None)
        if mine is None:
            mine = self._local.target = self.opener()
            with self._lock:
                self._opened.append(mine)
        return mine

    def close(self) -> None:
        for reg in self._opened:
            reg.close()

    def note(self, step: Step, status: str, message: str = "") -> None:
        outcome = Outcome(step, status, message or step.message)
        with self._lock:
            self.outcomes.append(outcome)
            if status not in USABLE and step.kind is Kind.RESOURCE:
                self.unusable.add(step.name)
            self.report(outcome)

    def created(self, step: Step, message: str = "") -> None:
        self.note(step, "created", message)
        seams.reached(CRASH_POINT)

    # -- one step of each kind --------------------------------------------------------

    def datatype(self, step: Step, d: DataType) -> None:
        try:
            self.target.add_datatype(d.name, d.content_type, d.extension)
        except errors.DatatypeTaken:
            self.note(step, "present", "created meanwhile by someone else")
            return
        self.created(step)

    def archive(self, step: Step, a: ArchiveRecord) -> None:
        try:
            self.target.add_archive(a.name, a.scheme, a.root, a.accessibility)
        except errors.ArchiveTaken:
            there = self.target.get_archive(a.name)
            if there is not None and (there.scheme, there.root.lower()) == (
                a.scheme,
                a.root.lower(),
            ):
                self.note(step, "present", "created meanwhile by someone else")
            else:
                self.note(step, "conflict", "another archive took this name or root meanwhile")
            return
        self.created(step)

    def resource(self, step: Step, r: ResourceRecord) -> None:
        first = step.location
        try:
            made = self.target.add_resource(
                dtype=r.dtype,
                archive=first.archive_name if first else None,
                name=r.name,
                sha1=r.sha1,
                metadata=r.metadata,
                key=first.key if first else None,
            )
        except (errors.NameTaken, errors.Sha1Taken):
            self._already(step, r)
            return
        except errors.RegistryRejected as err:
            self.note(step, "failed", f"{err}{_hint_for(err)}")
            return
        diffs = _changed_by_target(r, made)
        if diffs:
            why = "created, but the registry changed it: " + "; ".join(diffs)
            self.note(
                step, "altered", f"{why} (check the server's settings, e.g. metadata aliases)"
            )
            seams.reached(CRASH_POINT)
            return
        self.created(step)

    def _already(self, step: Step, r: ResourceRecord) -> None:
        """The resource's name or SHA-1 is taken: the same record is done, else a conflict."""
        there = self.target.get_resource(r.name)
        if there is None or (there.sha1 or "").lower() != (r.sha1 or "").lower():
            why = "its name or sha1 was registered meanwhile with other content"
            self.note(step, "conflict", why)
            return
        diffs = record_differences(r, there)
        if diffs:
            self.note(step, "conflict", "registered meanwhile, but " + "; ".join(diffs))
            return
        self.note(step, "present", "registered meanwhile (an earlier run, or someone else)")
        if step.location is not None:
            self.location(step, step.location, quiet=True)

    def location(self, step: Step, loc: LocationRecord, *, quiet: bool = False) -> None:
        if loc.resource_name in self.unusable:
            self.note(step, "blocked", f"resource {loc.resource_name!r} is not on the target")
            return
        try:
            self.target.add_location(loc.resource_name, loc.archive_name, key=loc.key)
        except errors.LocationTaken as err:
            held = [
                x
                for x in self.target.get_locations(loc.resource_name)
                if x.archive_name == loc.archive_name
            ]
            if held and (held[0].key or None) == (loc.key or None):
                if not quiet:
                    self.note(step, "present", "added meanwhile")
            else:
                self.note(step, "conflict", str(err))
            return
        except errors.RegistryRejected as err:
            self.note(step, "failed", str(err))
            return
        if quiet:
            seams.reached(CRASH_POINT)
        else:
            self.created(step)

    def run(self, step: Step) -> None:
        if step.verdict is not Verdict.CREATE:
            self.note(step, str(step.verdict))
            return
        record = step.record
        if isinstance(record, DataType):
            self.datatype(step, record)
        elif isinstance(record, ArchiveRecord):
            self.archive(step, record)
        elif isinstance(record, ResourceRecord):
            self.resource(step, record)
        elif isinstance(record, LocationRecord):
            self.location(step, record)
        else:  # pragma: no cover - plans are made by make_plan
            raise TypeError(f"a plan step without a record: {step}")


def _changed_by_target(sent: ResourceRecord, made: ResourceRecord) -> list[str]:
    """How the record the target returned differs from the exported one."""
    out = []
    if made.name != sent.name:
        out.append(f"name {made.name!r}")
    if (made.sha1 or "").lower() != (sent.sha1 or "").lower():
        out.append(f"sha1 {made.sha1}")
    return out + record_differences(sent, made)


def _hint_for(err: errors.RegistryRejected) -> str:
    if "experimenter" in err.fields:
        return " (create this user on the target server, e.g. in its Django admin, then re-run)"
    if "animal" in err.fields:
        return " (create this animal on the target server, then re-run)"
    return ""


def carry_out(
    plan: Plan,
    target: Registry,
    *,
    report: Report | None = None,
    advance: Callable[[int], None] | None = None,
    jobs: int = 1,
    opener: Callable[[], Registry] | None = None,
) -> list[Outcome]:
    """Creates what ``plan`` says on ``target``, in order; returns one outcome per step.

    With ``jobs`` > 1 and an ``opener`` (a new connection to the target per worker),
    the resources, then the locations, are created by that many threads at once: a
    server that hashes passwords with PBKDF2 spends about a second per authenticated
    request, and its workers can share the load. Each phase ends before the next
    begins. Transient and credential errors propagate (re-run to go on).
    """
    runner = _Runner(target, report, opener)
    step_done = advance or (lambda _n: None)

    def one(step: Step) -> None:
        runner.run(step)
        if step.verdict is Verdict.CREATE:
            step_done(1)

    pool = None
    if jobs > 1 and opener is not None:
        pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="migrate")
    try:
        for kind in Kind:
            phase = [s for s in plan.steps if s.kind is kind]
            if pool is None or kind in (Kind.DATATYPE, Kind.ARCHIVE):
                for step in phase:
                    one(step)
                continue
            futures = [pool.submit(one, step) for step in phase]
            try:
                for future in futures:
                    future.result()  # the phase ends before the next begins
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        runner.close()
    return runner.outcomes


__all__ = ["CRASH_POINT", "USABLE", "Outcome", "carry_out", "read_target"]

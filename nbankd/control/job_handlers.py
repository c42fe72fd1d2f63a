"""``copy`` and ``tape import`` handed to the running daemon (``nbankctl copy`` and
``nbankctl tape import`` with its configuration): ``copy`` and ``tape-import`` start
a job, ``job-status`` reports what it has done so far. Admins only (see
protocol.ADMIN_COMMANDS).

The daemon runs as the archives' ``access.user``, so the files it stores belong to
that user whoever asked. A job runs in a thread of its own with the same steps as
the command run by hand (:func:`nbankd.transfer.copying.copy_into`,
:func:`nbankd.tape_import.import_tar`), and records each line the command would
print as an event; nbankctl polls ``job-status`` and prints them as they come. Both
are re-runnable: a job cut short by the daemon's stop is finished by running the
same command again (what was stored is found there and only located).

A request line is at most 64 KiB, so a long list of identifiers comes in several
requests: each but the last says ``more``, and the job starts with the last.
The table of jobs is this module's own (the daemon keeps no record of them): the
last :data:`KEEP_FINISHED` finished jobs stay readable.

**Bounds.** At most :data:`MAX_UNFINISHED` jobs are collecting, waiting or running
at once (another is answered ``busy``), one job takes at most :data:`MAX_IDS`
identifiers, and a job keeps only the events nbankctl has not asked for yet (asking
from index ``since`` acknowledges the ones before), at most :data:`MAX_PENDING`:
older ones are dropped and counted (``skipped`` in the reply), while the job's own
tallies (``failures``, ``counts``) stay exact. Job ids are random, so a job is
reached only through the nbankctl that started it.

**One job per archive at a time**, as nbankctl's runs by hand are serialized by the
state directory's lock: a second copy or import into the same archive waits (and
says so) until the first ends. Two imports staging the same identifier at once
would otherwise remove each other's staged file.

**The tar file** is opened by the daemon, but only one the admin who asked could
read: its path (resolved by nbankctl) is walked from ``/`` one folder at a time
without following links, each folder checked searchable and the file readable by
the peer's user and groups, and the job reads that very file (pinned by an
``O_PATH`` descriptor, reopened through ``/proc/self/fd``), so it cannot be swapped
for a link, a FIFO or a device after the check. The peer comes from the control
server (``peer``, a :class:`~nbankd.control.peers.Peer`, never from the client).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from nbankd import errors, tape, tape_import
from nbankd.archive.opening import open_archive
from nbankd.control.deposit_handlers import configured_archive
from nbankd.control.peer_rights import peer_of
from nbankd.control.protocol import ProtocolError, no_nul, string_arg, wait_arg
from nbankd.control.tar_pin import pin_tar
from nbankd.transfer.copying import copy_into

if TYPE_CHECKING:
    from nbankd.daemon.view import DaemonView as Daemon
    from nbankd.registry.base import Registry
    from nbankd.transfer.reading import Advance

log = structlog.get_logger("nbankd.control")

#: the longest one job-status request waits for news (nbankctl polls)
STATUS_WAIT = 30.0
#: finished jobs kept for job-status
KEEP_FINISHED = 16
#: seconds a job may wait for the rest of its identifiers (``more``)
COLLECT_TIMEOUT = 600.0
#: events in one job-status reply at most, and their JSON's bytes at most
EVENTS_PER_REPLY = 10_000
REPLY_BYTES = 8 * 1024 * 1024
#: jobs collecting identifiers, waiting for their archive or running, at most
MAX_UNFINISHED = 16
#: identifiers of one job at most
MAX_IDS = 1_000_000
#: events a job keeps that nbankctl has not asked for; older ones are dropped
MAX_PENDING = 20_000


@dataclass
class Job:
    id: str
    kind: str
    work: Callable[[Job], None]
    archive: Path
    ids: list[str] | None = None
    started: bool = False
    created: float = field(default_factory=time.monotonic)
    events: deque[list[Any]] = field(default_factory=deque)
    base: int = 0  # the index of events[0]: those before were acknowledged or dropped
    dropped: int = 0
    failures: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    done: bool = False
    error: dict[str, Any] | None = None

    def add(self, event: list[Any]) -> None:
        with _CHANGED:
            self.events.append(event)
            while len(self.events) > MAX_PENDING:  # nbankctl fell behind, or is gone
                self.events.popleft()
                self.base += 1
                self.dropped += 1
            _CHANGED.notify_all()

    @property
    def next(self) -> int:
        return self.base + len(self.events)


_JOBS: dict[str, Job] = {}
_CHANGED = threading.Condition()
#: one lock per destination archive: its jobs run one at a time
_ARCHIVE_LOCKS: dict[Path, threading.Lock] = {}


class _JobOutput:
    """The copy's :class:`~nbankd.transfer.copying.Output` for nbankctl to replay."""

    def __init__(self, job: Job) -> None:
        self.job = job

    @property
    def failures(self) -> int:
        return self.job.failures

    def log(self, text: str) -> None:
        self.job.add(["log", text])

    def emit(self, obj: dict[str, Any]) -> None:
        self.job.add(["emit", obj])

    def failed(self, unreachable: bool) -> None:
        self.job.failures += 1
        self.job.add(["failed", unreachable])

    @contextmanager
    def progress(self, total: int | None) -> Iterator[Advance | None]:
        yield None


# --- arguments -----------------------------------------------------------------------


def _ids(args: dict[str, Any]) -> list[str] | None:
    ids = args.get("ids")
    if ids is None:
        return None
    if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
        raise ProtocolError("usage", "'ids' must be a list of identifiers")
    for i in ids:
        no_nul("ids", i)
    return ids


def _address(registry: Registry) -> str:
    db = getattr(registry, "db_path", None)
    return f"{registry.url} (embedded, {db})" if db is not None else registry.url


#: commands the dispatcher hands the peer (``args["peer"]``, a
#: :class:`~nbankd.control.peers.Peer` only it can make): a tar is read only when the
#: admin who asked could read it
PEER_COMMANDS = frozenset({"tape-import"})


# --- the job table -------------------------------------------------------------------


def _prune() -> None:
    """Forgets the oldest finished jobs beyond KEEP_FINISHED, and jobs whose
    identifiers stopped coming. Called with _CHANGED held."""
    now = time.monotonic()
    for job in list(_JOBS.values()):
        if not job.started and now - job.created > COLLECT_TIMEOUT:
            del _JOBS[job.id]
    finished = [j for j in _JOBS.values() if j.done]
    for job in finished[: max(0, len(finished) - KEEP_FINISHED)]:
        del _JOBS[job.id]


def _submit(
    kind: str, args: dict[str, Any], make: Callable[[], tuple[Path, Callable[[Job], None]]]
) -> Job:
    """The job the request creates (``make`` checks the request and gives the archive
    and the work) or continues (``job``); adds its identifiers and starts it unless
    ``more``."""
    more = args.get("more", False)
    if not isinstance(more, bool):
        raise ProtocolError("usage", "'more' must be true or false")
    ids = _ids(args)
    if more and ids is None:
        raise ProtocolError("usage", "'more' needs 'ids'")
    job_id = string_arg(args, "job")
    if job_id is None:
        archive, work = make()  # checks the request (reads the file system: not under _CHANGED)
    with _CHANGED:
        if job_id is None:
            _prune()
            unfinished = sum(not j.done for j in _JOBS.values())
            if unfinished >= MAX_UNFINISHED:
                raise ProtocolError(
                    "busy",
                    f"nbankd already has {unfinished} copies or imports under way or "
                    "waiting; run this one again once some have ended (nbankctl status)",
                    exit_code=errors.EXIT_UNREACHABLE,
                )
            job = Job(id=f"{kind}-{secrets.token_hex(12)}", kind=kind, work=work, archive=archive)
            job.ids = ids
            _JOBS[job.id] = job
        else:
            job = _JOBS.get(job_id)  # type: ignore[assignment]
            if job is None or job.kind != kind or job.started:
                raise ProtocolError("not-found", f"no {kind} job {job_id!r} waiting for more")
            if ids is None or job.ids is None:
                raise ProtocolError("usage", "'ids' must be given in every part of a job")
            job.ids += ids
        if job.ids is not None and len(job.ids) > MAX_IDS:
            del _JOBS[job.id]
            raise ProtocolError(
                "usage",
                f"more than {MAX_IDS} identifiers in one {kind}: split the list and run "
                "the command once for each part",
            )
        if not more:
            job.started = True
    if not more:
        log.info("job started", job=job.id, ids=None if job.ids is None else len(job.ids))
        threading.Thread(target=_run, args=(job,), name=job.id, daemon=True).start()
    return job


def _archive_lock(path: Path) -> threading.Lock:
    with _CHANGED:
        return _ARCHIVE_LOCKS.setdefault(path, threading.Lock())


def _run(job: Job) -> None:
    lock = _archive_lock(job.archive)
    try:
        if not lock.acquire(blocking=False):
            busy = f"another copy or import into {job.archive} is under way: waiting for it"
            job.add(["wait", busy])
            lock.acquire()
        try:
            job.work(job)
        finally:
            lock.release()
    except errors.NbankdError as err:
        job.error = {
            "code": err.code,
            "message": err.message,
            "hint": err.hint,
            "exit": err.exit_code,
        }
    except ProtocolError as err:  # the tar's checks, made again when the job starts
        job.error = {"code": err.code, "message": err.message, "hint": "", "exit": err.exit_code}
    except Exception as err:
        log.exception("job failed", job=job.id)
        job.error = {
            "code": "internal",
            "message": f"the {job.kind} failed in nbankd: {err!r} (see its log)",
            "hint": "",
            "exit": errors.EXIT_PROBLEMS,
        }
    finally:
        with _CHANGED:
            job.done = True
            _CHANGED.notify_all()
        log.info("job finished", job=job.id, failures=job.failures, error=job.error)


# --- commands ------------------------------------------------------------------------


def copy_job(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    """Starts copying the resources ``ids`` into the configured archive ``archive``
    (reading only copies in ``source_archive`` when given); returns the job's id
    (``job``) and the registry it uses (``registry``)."""

    def make() -> tuple[Path, Callable[[Job], None]]:
        config = configured_archive(daemon, args)
        source = string_arg(args, "source_archive")

        def work(job: Job) -> None:
            if not job.ids:
                raise errors.UsageError("no identifiers given")
            archive = open_archive(config.path)
            copy_into(daemon.registry, archive, job.ids, _JobOutput(job), source_archive=source)

        return config.path, work

    job = _submit("copy", args, make)
    return {"job": job.id, "registry": _address(daemon.registry)}


def tape_import_job(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    """Starts importing the resources of the tar file ``tar`` (a path nbankd can
    read), only ``ids`` when given, into the configured archive ``archive``."""

    peer = peer_of(args)

    def make() -> tuple[Path, Callable[[Job], None]]:
        config = configured_archive(daemon, args)
        tar = Path(str(string_arg(args, "tar", required=True)))
        max_size = args.get("max_size")
        if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, int)):
            raise ProtocolError("usage", "'max_size' must be a number of bytes")
        if not tar.is_absolute():
            raise ProtocolError("usage", f"'tar' must be an absolute path, not {str(tar)!r}")
        pin_tar(tar, peer).close()  # refused now rather than in the job

        def work(job: Job) -> None:
            def report(outcome: tape.Outcome) -> None:
                with _CHANGED:
                    job.counts[outcome.status] += 1
                    job.failures += not outcome.ok
                job.add(["outcome", outcome.to_json()])

            pinned = pin_tar(tar, peer)  # checked again: this is the file read
            try:
                tape_import.import_tar(
                    daemon.registry,
                    pinned,
                    config.path,
                    wanted=job.ids,
                    max_size=max_size,
                    report=report,
                )
            finally:
                pinned.close()

        return config.path, work

    job = _submit("tape-import", args, make)
    return {"job": job.id, "registry": _address(daemon.registry)}


def job_status(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    """The events of job ``job`` from index ``since`` on, waiting up to ``wait``
    seconds (at most :data:`STATUS_WAIT`) for news; ``done`` once it has ended and
    every event was given. Without ``job``, the number of jobs under way."""
    job_id = string_arg(args, "job")
    if job_id is None:
        with _CHANGED:
            return {"running": sum(j.started and not j.done for j in _JOBS.values())}
    since = args.get("since", 0)
    if isinstance(since, bool) or not isinstance(since, int) or since < 0:
        raise ProtocolError("usage", "'since' must be an event index")
    deadline = time.monotonic() + wait_arg(args, "wait", STATUS_WAIT)
    with _CHANGED:
        job = _JOBS.get(job_id)
        if job is None:
            raise ProtocolError("not-found", f"no job {job_id!r}")
        if since > job.next:
            raise ProtocolError("usage", f"'since' is past the job's last event ({job.next})")
        while job.base < since:  # acknowledged: nbankctl has them
            job.events.popleft()
            job.base += 1
        while not job.done and job.next <= since:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            _CHANGED.wait(remaining)
        skipped = job.base - since if since < job.base else 0
        events: list[list[Any]] = []
        size = 0
        for event in job.events:
            if len(events) >= EVENTS_PER_REPLY or (events and size > REPLY_BYTES):
                break
            size += len(json.dumps(event))
            events.append(event)
        following = max(since, job.base) + len(events)
        return {
            "done": job.done and following >= job.next,
            "events": events,
            "next": following,
            "skipped": skipped,
            "failures": job.failures,
            "counts": dict(job.counts),
            "error": job.error,
        }


COMMANDS = {"copy": copy_job, "tape-import": tape_import_job, "job-status": job_status}

__all__ = ["COMMANDS", "PEER_COMMANDS", "copy_job", "job_status", "tape_import_job"]

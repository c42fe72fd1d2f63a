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
"""

from __future__ import annotations

import itertools
import os
import pwd
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from nbankd import errors, tape, tape_import
from nbankd.archive.opening import open_archive
from nbankd.control.protocol import ProtocolError
from nbankd.transfer.copying import copy_into

if TYPE_CHECKING:
    from nbankd.config.model import ArchiveConfig
    from nbankd.daemon.view import DaemonView as Daemon
    from nbankd.registry.base import Registry
    from nbankd.transfer.reading import Advance

log = structlog.get_logger("nbankd.control")

#: the longest one job-status request waits for news (nbankctl polls)
STATUS_WAIT = 30.0
#: finished jobs kept for job-status
KEEP_FINISHED = 64
#: seconds a job may wait for the rest of its identifiers (``more``)
COLLECT_TIMEOUT = 600.0
#: events in one job-status reply at most
EVENTS_PER_REPLY = 10_000


@dataclass
class Job:
    id: str
    kind: str
    work: Callable[[Job], None]
    ids: list[str] | None = None
    started: bool = False
    created: float = field(default_factory=time.monotonic)
    events: list[list[Any]] = field(default_factory=list)
    failures: int = 0
    done: bool = False
    error: dict[str, Any] | None = None

    def add(self, event: list[Any]) -> None:
        with _CHANGED:
            self.events.append(event)
            _CHANGED.notify_all()


_JOBS: dict[str, Job] = {}
_CHANGED = threading.Condition()
_NUMBERS = itertools.count(1)


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


def _str(args: dict[str, Any], key: str, *, required: bool = False) -> str | None:
    value = args.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise ProtocolError("usage", f"{key!r} must be a non-empty string")
    return value


def _ids(args: dict[str, Any]) -> list[str] | None:
    ids = args.get("ids")
    if ids is None:
        return None
    if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
        raise ProtocolError("usage", "'ids' must be a list of identifiers")
    return ids


def _archive(daemon: Daemon, args: dict[str, Any]) -> ArchiveConfig:
    path = Path(str(_str(args, "archive", required=True)))
    archive = next((a for a in daemon.config.archives if a.path == path), None)
    if archive is None:
        raise ProtocolError(
            "not-found",
            f"archive {path} is not one of this daemon's archives "
            f"({', '.join(str(a.path) for a in daemon.config.archives) or 'none'})",
        )
    return archive


def _address(registry: Registry) -> str:
    db = getattr(registry, "db_path", None)
    return f"{registry.url} (embedded, {db})" if db is not None else registry.url


def _me() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


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


def _submit(kind: str, args: dict[str, Any], make: Callable[[], Callable[[Job], None]]) -> Job:
    """The job the request creates (``make`` checks the request and gives the work)
    or continues (``job``); adds its identifiers and starts it unless ``more``."""
    more = args.get("more", False)
    if not isinstance(more, bool):
        raise ProtocolError("usage", "'more' must be true or false")
    ids = _ids(args)
    if more and ids is None:
        raise ProtocolError("usage", "'more' needs 'ids'")
    job_id = _str(args, "job")
    with _CHANGED:
        if job_id is None:
            work = make()
            _prune()
            job = Job(id=f"{kind}-{os.getpid()}-{next(_NUMBERS)}", kind=kind, work=work)
            job.ids = ids
            _JOBS[job.id] = job
        else:
            job = _JOBS.get(job_id)  # type: ignore[assignment]
            if job is None or job.kind != kind or job.started:
                raise ProtocolError("not-found", f"no {kind} job {job_id!r} waiting for more")
            if ids is None or job.ids is None:
                raise ProtocolError("usage", "'ids' must be given in every part of a job")
            job.ids += ids
        if not more:
            job.started = True
    if not more:
        log.info("job started", job=job.id, ids=None if job.ids is None else len(job.ids))
        threading.Thread(target=_run, args=(job,), name=job.id, daemon=True).start()
    return job


def _run(job: Job) -> None:
    try:
        job.work(job)
    except errors.NbankdError as err:
        job.error = {
            "code": err.code,
            "message": err.message,
            "hint": err.hint,
            "exit": err.exit_code,
        }
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

    def make() -> Callable[[Job], None]:
        config = _archive(daemon, args)
        source = _str(args, "source_archive")

        def work(job: Job) -> None:
            if not job.ids:
                raise errors.UsageError("no identifiers given")
            archive = open_archive(config.path)
            copy_into(daemon.registry, archive, job.ids, _JobOutput(job), source_archive=source)

        return work

    job = _submit("copy", args, make)
    return {"job": job.id, "registry": _address(daemon.registry)}


def tape_import_job(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    """Starts importing the resources of the tar file ``tar`` (a path nbankd can
    read), only ``ids`` when given, into the configured archive ``archive``."""

    def make() -> Callable[[Job], None]:
        config = _archive(daemon, args)
        tar = Path(str(_str(args, "tar", required=True)))
        max_size = args.get("max_size")
        if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, int)):
            raise ProtocolError("usage", "'max_size' must be a number of bytes")
        if not tar.is_absolute():
            raise ProtocolError("usage", f"'tar' must be an absolute path, not {str(tar)!r}")
        try:
            readable = stat.S_ISREG(os.stat(tar).st_mode) and os.access(tar, os.R_OK)
        except OSError as err:
            raise ProtocolError(
                "not-found", f"nbankd cannot read {tar}: {err.strerror or err}"
            ) from None
        if not readable:
            raise ProtocolError(
                "usage",
                f"nbankd (running as {_me()!r}) cannot read {tar} as a file: give a tar file "
                "it can read, or run the import as the archive's user without the daemon "
                "configuration",
            )

        def work(job: Job) -> None:
            def report(outcome: tape.Outcome) -> None:
                job.add(["outcome", outcome.to_json()])

            tape_import.import_tar(
                daemon.registry,
                tar,
                config.path,
                wanted=job.ids,
                max_size=max_size,
                report=report,
            )

        return work

    job = _submit("tape-import", args, make)
    return {"job": job.id, "registry": _address(daemon.registry)}


def job_status(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    """The events of job ``job`` from index ``since`` on, waiting up to ``wait``
    seconds (at most :data:`STATUS_WAIT`) for news; ``done`` once it has ended and
    every event was given. Without ``job``, the number of jobs under way."""
    job_id = _str(args, "job")
    if job_id is None:
        with _CHANGED:
            return {"running": sum(j.started and not j.done for j in _JOBS.values())}
    since = args.get("since", 0)
    wait = args.get("wait", 0)
    if isinstance(since, bool) or not isinstance(since, int) or since < 0:
        raise ProtocolError("usage", "'since' must be an event index")
    if isinstance(wait, bool) or not isinstance(wait, (int, float)):
        raise ProtocolError("usage", "'wait' must be a number of seconds")
    deadline = time.monotonic() + min(max(float(wait), 0.0), STATUS_WAIT)
    with _CHANGED:
        job = _JOBS.get(job_id)
        if job is None:
            raise ProtocolError("not-found", f"no job {job_id!r}")
        while not job.done and len(job.events) <= since:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            _CHANGED.wait(remaining)
        events = job.events[since : since + EVENTS_PER_REPLY]
        following = since + len(events)
        return {
            "done": job.done and following >= len(job.events),
            "events": events,
            "next": following,
            "failures": job.failures,
            "error": job.error,
        }


COMMANDS = {"copy": copy_job, "tape-import": tape_import_job, "job-status": job_status}

__all__ = ["COMMANDS", "copy_job", "job_status", "tape_import_job"]

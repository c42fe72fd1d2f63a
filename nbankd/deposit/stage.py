"""The stage step: the claimed input copied into the archive's ``staging/`` while
hashed in the same pass (or, placed by rename, hashed in place; a folder deposited
as its zip written there), its metadata read by the datatype's reader. A mixin of
:class:`~nbankd.deposit.steps.Steps`.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import replace
from pathlib import Path, PurePosixPath

from nbankd import canonical_zip, errors, metadata_readers, seams
from nbankd.archive import durable, layout, opening
from nbankd.deposit import verdicts_changed
from nbankd.deposit.identity import (
    fstat_matches,
    reidentified,
    same_identity,
    staged_id,
)
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import Outcome
from nbankd.deposit.outcomes import outcome_for
from nbankd.deposit.spec import Intent
from nbankd.deposit.stepbase import StepResult, StepsBase
from nbankd.hashing import SourceReadError, copy_hashing
from nbankd.names import MANUAL_INBOX_PREFIX
from nbankd.watch import writers


def unreadable(item: Item, detail: str = "") -> Outcome:
    """The rejection of an input the daemon's user cannot read."""
    return Outcome(
        "permanent",
        "unreadable",
        f"{item.relpath_str!r} cannot be read by the nbankd user{': ' + detail if detail else ''}",
        "make it readable by the inbox's group (e.g. setgid inbox folder, umask 002) "
        "and requeue it",
    )


class StageSteps(StepsBase):
    """Staging: the claimed input's copy (or in-place hash) and its file metadata."""

    def stage(self, item: Item) -> StepResult:
        spec = self._spec(item)
        with spec.open_fs() as fs:
            return self._stage(Intent.of(item), item, fs.at(fs.work, item.token))

    def _stage(self, intent: Intent, item: Item, work: Path) -> StepResult:
        archive = self._archive(intent)
        if item.kind == "dir" and item.zipped:
            item, outcome = self._stage_zip(archive, item, work)
            if outcome.kind != "ok":
                return item, outcome
        elif item.kind == "dir":
            if not same_identity(item.identity, work, True):
                return item, Outcome("changed", "changed", "the folder changed after claiming")
            staged = None
            try:
                if intent.placement == "rename":  # the folder itself is published: read only
                    self._discard_leftovers(archive, item)  # an older release's copy
                    sha1, size = durable.hash_tree(archive, work, progress=self._progress)
                else:
                    staged = durable.stage_copy_tree(
                        archive, work, self._new_staged_name(archive, item), progress=self._progress
                    )
                    sha1, size = staged.sha1, staged.size
            except SourceReadError as err:
                if err.errno in (errno.EACCES, errno.EPERM):
                    return item, unreadable(item, str(err))
                raise
            except errors.InputChanged as err:  # a file replaced, or still open for writing
                return item, Outcome("changed", err.code, err.message, err.hint)
            if not same_identity(item.identity, work, True):
                if staged is not None:
                    durable.discard_staged(archive, staged.path)
                return item, Outcome("changed", "changed", "the folder changed during the copy")
            item = item.changed(sha1=sha1, size=size)
            if staged is not None:
                item = item.changed(staged_identity=staged_id(staged.path))
        else:
            try:
                fd = os.open(work, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except PermissionError:
                return item, unreadable(item)
            with os.fdopen(fd, "rb") as f:
                if not fstat_matches(item.identity, os.fstat(f.fileno())):
                    return item, Outcome("changed", "changed", "the file changed after claiming")
                if writers.open_for_writing(f.fileno()):  # quiet, but not finished
                    return item, verdicts_changed.still_open_for_writing(item.relpath_str)
                if intent.placement == "rename":
                    hashed = copy_hashing(f, None, progress=self._progress)
                    sha1, size = hashed.sha1, hashed.size
                else:
                    staged = durable.stage_copy(  # the descriptor: a large file's copy
                        archive,  # then reads, hashes and writes at once (streaming)
                        f.fileno(),
                        self._new_staged_name(archive, item),
                        progress=self._progress,
                    )
                    sha1, size = staged.sha1, staged.size
                    item = item.changed(staged_identity=staged_id(staged.path, staged.identity))
                seams.reached("stage-copied")
                st = os.fstat(f.fileno())
                if not fstat_matches(item.identity, st):
                    if intent.placement != "rename":
                        durable.discard_staged(archive, staged.path)
                    return item, Outcome("changed", "changed", "the file changed during the copy")
                if size != st.st_size:  # a read ended early (a flaky network filesystem):
                    if intent.placement != "rename":  # never a part of the file for all of it
                        durable.discard_staged(archive, staged.path)
                    return item, Outcome(
                        "transient",
                        "os-error",
                        f"reading the file ended after {size} of its {st.st_size} bytes; "
                        "it is read again",
                    )
            item = item.changed(sha1=sha1, size=size)
        if item.file_metadata in ("read", "override"):
            source = (
                work
                if intent.placement == "rename"
                else archive.staging_dir / self.staged_name(item)
            )
            item, outcome = self._read_file_metadata(
                archive, item, source, only_copy=intent.placement == "rename"
            )
            if outcome.kind != "ok":
                return item, outcome
        seams.reached("after-stage")
        return item, Outcome.ok()

    def _stage_zip(self, archive: layout.Archive, item: Item, work: Path) -> StepResult:
        """Writes the claimed folder's canonical zip into staging/, hashed and fsynced."""
        if not same_identity(item.identity, work, True):
            return item, Outcome("changed", "changed", "the folder changed after claiming")
        durable.check_present(archive)
        opening.ensure_staging(archive)
        try:
            zipped = canonical_zip.zip_folder(
                work,
                archive.staging_dir,
                self._new_staged_name(archive, item),
                progress=self._progress,
            )
        except SourceReadError as err:
            if err.errno in (errno.EACCES, errno.EPERM):
                return item, unreadable(item, str(err))
            raise
        except errors.InputChanged as err:
            return item, Outcome("changed", err.code, err.message, err.hint)
        except errors.UnsafeInput as err:
            shown = err.message.replace(str(work), item.relpath_str)
            return item, Outcome("permanent", err.code, shown, err.hint)
        if not same_identity(item.identity, work, True):
            durable.discard_staged(archive, zipped.path)
            return item, Outcome("changed", "changed", "the folder changed while it was zipped")
        item = replace(
            item, sha1=zipped.sha1, size=zipped.size, staged_identity=staged_id(zipped.path)
        )
        return item, Outcome.ok()

    def _kept_after_reader(self, item: Item, source: Path, before: os.stat_result) -> Item | None:
        """``item`` after a confined reader changed only the status of the claimed input
        ``source`` (placed by rename: the recording's only copy): the same inode, size
        and links, its bytes still the SHA-1 taken before the reader ran; its times and
        mode as ``before`` again, its identity taken anew (its change time moved). None
        when the reader could write (unconfined) or anything else differs."""
        if item.sha1 is None or metadata_readers.reader_confinement() is not None:
            return None
        try:
            fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            same = (st.st_dev, st.st_ino, st.st_size, st.st_nlink)
            if same != (before.st_dev, before.st_ino, before.st_size, before.st_nlink):
                return None
            if copy_hashing(f, None, progress=self._progress).sha1 != item.sha1:
                return None
            os.fchmod(fd, stat.S_IMODE(before.st_mode))
            os.utime(fd, ns=(before.st_atime_ns, before.st_mtime_ns))
        return item.changed(identity=reidentified(item.identity, source, False))

    def _read_file_metadata(
        self, archive: layout.Archive, item: Item, source: Path, *, only_copy: bool
    ) -> StepResult:
        """Runs the datatype's reader on the staged bytes (``only_copy``: the claimed
        input itself, placed by rename) and merges the file's metadata into the
        journaled one under the mode fixed at claim.

        The reader runs after the SHA-1 was taken, and is confined so that it cannot
        write what it reads; a change it made all the same (``changed``) is caught
        before anything is registered: a staged copy is discarded and the input waits
        (staged anew), the input itself goes back as changed. Where the reader cannot
        be confined, it is never run on the input itself: the input waits."""
        assert item.dtype is not None and item.file_metadata in ("read", "override")
        name = PurePosixPath(item.relpath_str).name + (".zip" if item.zipped else "")
        before = os.stat(source, follow_symlinks=False) if only_copy else None
        result = self.metadata_reader(item.dtype, source, name, only_copy=only_copy)
        if result.status == "changed" and before is not None:
            kept = self._kept_after_reader(item, source, before)
            if kept is None:  # the bytes hashed may be gone
                unhashed = item.changed(sha1=None, size=None)
                return unhashed, Outcome("changed", "changed", result.message)
            # the reader (confined: it could not write) set the input's times or mode:
            # put back, the bytes checked; it waits, told, until the reader is fixed
            # (never put back to the inbox to be claimed and touched again, unseen)
            return kept, Outcome(
                "transient",
                metadata_readers.MetadataReaderUnavailable.code,
                f"{result.message}; its bytes are unchanged and its times and mode were put back",
                "fix the reader (it must leave the file's times and mode alone), or "
                "deposit without it (file_metadata: skip)",
            )
        problem = result.error()
        if problem is None and result.status == "read":
            try:
                merged = metadata_readers.merge_metadata(
                    json.loads(item.metadata_json or "{}"),
                    result.metadata,
                    item.file_metadata,  # type: ignore[arg-type]
                    source=repr(item.relpath_str),
                )
            except metadata_readers.MetadataMismatch as err:
                problem = err
            else:
                metadata_json = json.dumps(merged, sort_keys=True, default=str)
                return item.changed(metadata_json=metadata_json), Outcome.ok()
        if problem is None:
            return item, Outcome.ok()  # no reader for this datatype
        if problem.transient:  # the reader, not the file: the input waits, staged anew
            durable.discard_staged(archive, archive.staging_dir / self.staged_name(item))
            if item.inbox.startswith(MANUAL_INBOX_PREFIX):
                # by hand, as nbank: the file is refused and left where it was, the
                # person who ran the command told what to do (an inbox's input waits)
                return item, Outcome(
                    "permanent",
                    problem.code,
                    f"{problem.message}; fix the reader, or deposit the file without "
                    "reading its metadata (nbankctl deposit --no-file-metadata)",
                )
        return item, outcome_for(problem)

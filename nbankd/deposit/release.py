"""How a claimed input leaves the inbox's work folder: released (removed once its
deposit is recorded), put back into the inbox (it changed: a writer kept it), or
moved to the rejected folder; and the checks that an input is still what its claim
recorded (:meth:`ReleaseSteps._as_claimed`) or still holds the content hashed
(:meth:`ReleaseSteps._content_as_hashed`, for a publish in place: never while a
program holds it open for writing; one whose bytes changed is put back, its deposit
withdrawn: :meth:`ReleaseSteps._withdraw`). A mixin of
:class:`~nbankd.deposit.steps.Steps`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

from nbankd import canonical_zip, errors, seams
from nbankd.archive import durable, fsops, syncs, treeremoval
from nbankd.deposit import damaged, inboxfs, rejection, verdicts_changed
from nbankd.deposit.identity import (
    Change,
    boot_id,
    compare_stat,
    fstat_matches,
    identity_fields,
    marker_is_claimed,
    power_loss_only,
    renewed,
    restarted_since,
    stat_fields,
)
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import Outcome
from nbankd.deposit.spec import InboxSpec, Intent
from nbankd.deposit.stepbase import StepResult, StepsBase, log
from nbankd.hashing import SourceReadError, copy_hashing
from nbankd.names import printable
from nbankd.watch import writers

#: a released folder's name while it is removed (see :meth:`ReleaseSteps.release`)
RELEASED_SUFFIX = b".released"


class ReleaseSteps(StepsBase):
    """The release, put-back and reject steps (see the module's text)."""

    def release(self, item: Item) -> StepResult:
        spec = self._spec(item)

        def source() -> str:  # in messages only
            return printable(str(spec.path / item.relpath_str))

        with spec.open_fs() as fs:
            token = item.token.encode()
            gone = token + RELEASED_SUFFIX
            st = fs.lstat(fs.work, token)
            if st is not None and not self._as_claimed(item, st, fs.at(fs.work, item.token)):
                if self._damaged_across_restart(item, st, fs.at(fs.work, item.token)):
                    # a power loss's damage but for its status: back whole, marked to
                    # be rejected as a damaged copy (never deposited again)
                    assert item.identity is not None
                    outcome = damaged.put_back(item.relpath_str, item.name)
                    return item.changed(identity=damaged.marked(item.identity)), outcome
                # a writer kept it open and changed it after its copy was made: the
                # archive keeps the copy as claimed; this version goes back, whole
                return item, verdicts_changed.changed_after_deposit(item.relpath_str, item.name)
            # removals in the inbox's work folder: a failure is the inbox's (a read-only
            # mount, an immutable folder), never the archive's, which holds the copy
            with inboxfs.writing(
                lambda: (
                    f"remove the deposited input {source()} from the inbox's work "
                    f"folder {printable(str(spec.work_dir))}"
                ),
                [spec.work_dir],
            ):
                if st is not None and not stat.S_ISDIR(st.st_mode):
                    fs.unlink(fs.work, token)
                else:
                    # a folder resource's tree: renamed first, then removed, so that a
                    # removal stopped half way is finished by the next attempt, never taken
                    # for a changed input (only the daemon writes in its work folder)
                    # changed from descriptors, never through a path: its writer may have
                    # kept a descriptor of a folder of it and swap a sub-folder for a link
                    shown = str(spec.work_dir / os.fsdecode(gone))  # in messages
                    if fs.lstat(fs.work, gone) is not None:
                        treeremoval.remove_tree_at(fs.work, gone, shown=shown)
                    if st is not None:
                        os.rename(token, gone, src_dir_fd=fs.work, dst_dir_fd=fs.work)
                        treeremoval.remove_tree_at(fs.work, gone, shown=shown)
                seams.reached("after-release-source")
                sidecar = rejection.sidecar_work_name(item)
                if sidecar is not None:
                    fs.unlink(fs.work, sidecar)
            if item.marker_relpath is not None:
                self._release_marker(spec, fs, item, source)
            syncs.fsync_soon(  # before DONE is saved; shared by a round's releases
                fs.work,
                told=lambda err: inboxfs.write_error(
                    err,
                    f"make the removal of the deposited input {source()} from the inbox's "
                    f"work folder {printable(str(spec.work_dir))} durable",
                    [spec.work_dir],
                ),
            )
        seams.reached("after-release-unlink")
        return item.changed(finished=item.finished or self.clock()), Outcome.ok()

    @staticmethod
    def _release_marker(
        spec: InboxSpec, fs: inboxfs.InboxFS, item: Item, source: Callable[[], str]
    ) -> None:
        """Removes the released input's ready marker when it is still the one its claim
        found; one set since (created, written or touched: the rig marked its next
        recording of the name done) is left for that recording, logged."""
        assert item.marker_relpath is not None
        where = spec.path / os.fsdecode(os.path.dirname(item.marker_relpath))
        with (
            contextlib.suppress(inboxfs.Escape, FileNotFoundError, NotADirectoryError),
            inboxfs.writing(lambda: f"remove the ready marker of {source()}", [where]),
        ):
            marker = fs.parent(item.marker_relpath)  # its folder may be gone
            st = fs.lstat(*marker)
            if st is None:
                return
            if not marker_is_claimed(item.identity, stat_fields(st)):
                log.info(
                    "ready marker set again since the claim: left for the next recording "
                    "of the name",
                    item=item.token,
                    marker=printable(os.fsdecode(item.marker_relpath)),
                )
                return
            if fs.unlink(*marker):
                fsops.fsync_fd(marker[0])

    def _withdraw(self, intent: Intent, item: Item, work: Path, target: Path) -> StepResult:
        """Placed by rename, the input changed after registering: the bytes its record
        names are nowhere any more (the input was never copied) and can never be
        published. The input, the only version left, goes back where it was
        (WITHDRAWN), no longer counted registered (its URL dropped: nothing reports it
        deposited). The record is left as it is: another input may still serve it, and
        the registry's account may not remove locations; unless one does, the audit
        reports it missing from the archive. Logged as an error naming the record.
        Should ``target`` be the input itself (linked there by an attempt killed before
        its save, then written through a name of it), nothing moves: that stored copy
        is not the record's any more, and it stays where it is (a transient CHANGED,
        as the audit reports)."""
        assert item.name and item.sha1
        with contextlib.suppress(OSError):
            if os.path.samestat(os.lstat(work), os.lstat(target)):
                return item, verdicts_changed.changed_before_publish(
                    item.relpath_str, item.name, item.sha1
                )
        log.error(
            "input changed after its registration: not published, put back where it was; "
            "its record names bytes that only another copy could serve",
            item=item.token,
            resource_id=item.name,
            sha1=item.sha1,
            archive=intent.archive_name,
        )
        return item.changed(url=None), verdicts_changed.withdrawn_before_publish(
            item.relpath_str, item.name, item.sha1, intent.archive_name
        )

    def _content_as_hashed(self, item: Item, work: Path) -> Item | StepResult | None:
        """Whether the input published in place still has the content the stage step
        hashed (and the registry recorded), and no program holds it open for writing.
        The item, to publish: the same identity; or the same SHA-1 when only its ctime
        or its numbers moved (an earlier attempt's mode change, an SSHFS remount), or,
        its size the same, its mtime moved (a touch, the same bytes written again) and
        the kernel tells that no program holds it, its identity then journaled anew; or
        gone from the work folder (published by an earlier attempt: publishing knows
        what to do). A step result, not now (a transient outcome): a program holds it
        (a file of it) open for writing; it changed while it was hashed again; or its
        mtime moved, its bytes the same, and whether a program holds it cannot be told
        (its identity then journaled: published if it stays unchanged until the next
        attempt). None when its bytes changed. A read that ends early is an error
        (transient), not a change."""
        is_dir = item.kind == "dir"
        if item.identity is None:
            return item
        try:
            before = identity_fields(work) if is_dir else stat_fields(os.lstat(work))
        except FileNotFoundError:
            return item
        change = compare_stat(item.identity, before)
        recorded_size = json.loads(item.identity).get("size")
        if change is Change.CONTENT and before["size"] != recorded_size:
            return None
        shown = item.relpath_str
        held = self._held(work, is_dir)
        if held:  # never published while a program could still change the stored copy
            return item, verdicts_changed.held_at_publish(shown, item.name)
        if change is Change.SAME:
            return item
        same = self._same_sha1(item, work, is_dir, whole=True)
        after = identity_fields(work) if is_dir else stat_fields(os.lstat(work))
        if after != before:
            return item, verdicts_changed.written_while_rehashed(shown, item.name)
        if not same:
            return None
        # the identity checked unchanged across the hash, not a later look at the input
        seen = item.changed(identity=renewed(item.identity, {**after, "boot": boot_id()}))
        if change is Change.UNSURE or held is False:
            return seen
        # its mtime moved, its bytes the same, and whether a program still holds it
        # cannot be told: published if it stays unchanged until the next attempt
        return seen, verdicts_changed.rewritten_same_bytes(shown, item.name)

    @staticmethod
    def _held(work: Path, is_dir: bool) -> bool | None:
        """Whether a program holds the input at ``work`` (a file, or a file of a folder)
        open for writing; None when the kernel cannot tell."""
        try:
            fd = os.open(work.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            name = os.fsencode(work.name)
            if is_dir:
                return writers.tree_open_for_writing_at(fd, name)
            return writers.open_for_writing_at(fd, name)
        finally:
            os.close(fd)

    def _as_claimed(self, item: Item, st: os.stat_result, work: Path) -> bool:
        """True when the claimed input ``st`` (an lstat of ``work``) is still the one its
        claim recorded: the same identity (or none recorded: an older journal); or its
        size and mtime as recorded and its SHA-1 the deposited one (a mode or group
        changed, an SSHFS remount numbered it anew); or, after the machine restarted since
        the claim, no larger and with neither its modification nor its change time later
        than recorded (:func:`~nbankd.deposit.identity.power_loss_only`: a power loss
        takes unflushed bytes and their times, never adds any, while a writer's rewrite
        after the claim, even to the same size, moves both; its stored copy was durable
        and verified before the record); or a folder an older release claimed (which
        removed folders in place: what a removal stopped half way left is finished, as
        that release would have)."""
        if item.identity is None:
            return True
        is_dir = stat.S_ISDIR(st.st_mode)
        if not is_dir and fstat_matches(item.identity, st):  # the usual answer, at once
            return True
        try:
            now = identity_fields(work) if is_dir else stat_fields(st)
        except FileNotFoundError:
            return True
        change = compare_stat(item.identity, now)
        if change is Change.SAME:
            return True
        claimed = json.loads(item.identity)
        if is_dir and "boot" not in claimed:
            return True
        if restarted_since(item.identity, item.created) and power_loss_only(claimed, now):
            log.info(
                "input changed across a restart of the machine; removed, its stored copy "
                "being complete",
                item=item.token,
                resource_id=item.name,
            )
            return True
        if change is not Change.UNSURE:
            return False
        try:
            return self._same_sha1(item, work, is_dir)
        except (SourceReadError, errors.InputChanged, errors.UnsafeInput):
            return False  # unreadable now, open for writing, a link: not as claimed

    @staticmethod
    def _damaged_across_restart(item: Item, st: os.stat_result, work: Path) -> bool:
        """True when the claimed input ``st`` (not as claimed), found after a restart of
        the machine since the claim, is no larger and no newer than claimed: a power
        loss's damage, though its status changed since (its ctime is later)."""
        if item.identity is None or not restarted_since(item.identity, item.created):
            return False
        try:
            now = identity_fields(work) if stat.S_ISDIR(st.st_mode) else stat_fields(st)
        except FileNotFoundError:
            return False
        return damaged.no_larger_no_newer(json.loads(item.identity), now)

    def _same_sha1(self, item: Item, work: Path, is_dir: bool, *, whole: bool = False) -> bool:
        """True when the input at ``work`` hashes to the item's SHA-1 (a folder stored
        as its zip is zipped again into staging/ to compare, then discarded). Reads
        beat the worker's liveness, as the stage step's do. With ``whole``, a file read
        to fewer bytes than its size raises SourceReadError (a read cut short, as on a
        flaky network filesystem, is not a change)."""
        if item.sha1 is None:
            return False
        if is_dir:
            archive = self._archive(Intent.of(item))
            if item.zipped:
                zipped = canonical_zip.zip_folder(
                    work,
                    archive.staging_dir,
                    self._new_staged_name(archive, item),
                    progress=self._progress,
                )
                durable.discard_staged(archive, zipped.path)
                return zipped.sha1 == item.sha1
            sha1, _size = durable.hash_tree(archive, work, progress=self._progress)
            return sha1 == item.sha1
        try:
            fd = os.open(work, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as err:
            raise SourceReadError(err.errno, err.strerror, str(work)) from err
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return False
            hashed = copy_hashing(fd, None, progress=self._progress)
            if whole and hashed.size < st.st_size:
                raise SourceReadError(
                    errno.EIO, f"read {hashed.size} of its {st.st_size} bytes", str(work)
                )
            return hashed.sha1 == item.sha1
        finally:
            os.close(fd)

    def reject(self, item: Item) -> StepResult:
        spec = self._spec(item)
        self._discard_staged_if_configured(item)  # the archive's side, before the inbox's
        source = printable(str(spec.path / item.relpath_str))
        with (
            spec.open_fs() as fs,
            inboxfs.writing(
                f"move {source} into the rejected folder {printable(str(spec.rejected_dir))}",
                [spec.rejected_dir, spec.work_dir],
            ),
        ):
            item = rejection.move_to_rejected(
                spec, item, fs=fs, now=self.clock(), save=self.journal.save
            )
        return item.changed(finished=self.clock()), Outcome.ok()

    def put_back(self, item: Item) -> StepResult:
        spec = self._spec(item)
        self._discard_staged_if_configured(item)  # the archive's side, before the inbox's
        source = spec.path / item.relpath_str
        with (
            spec.open_fs() as fs,
            inboxfs.writing(
                f"put {printable(str(source))} back into its inbox {printable(str(spec.path))}",
                [source.parent, spec.work_dir],
            ),
        ):
            sha1 = self._damaged_sha1(item, fs)
            placed = rejection.put_back(spec, item, fs=fs)
            if sha1 is not None and placed is not None:
                item = self._damaged_noted(item, fs, placed, sha1)
        return item.changed(finished=self.clock()), Outcome.ok()

    @staticmethod
    def _damaged_sha1(item: Item, fs: inboxfs.InboxFS) -> str | None:
        """For an input put back as a damaged copy, still in the work folder: its SHA-1
        ("" for a folder); None for any other, or one moved already (run again)."""
        token = item.token.encode()
        st = fs.lstat(fs.work, token) if damaged.is_marked(item.identity) else None
        if st is None:
            return None
        if stat.S_ISDIR(st.st_mode):
            return ""
        try:
            return damaged.file_sha1(fs.at(fs.work, token))
        except OSError as err:
            log.warning("damaged copy unreadable: not told apart", item=item.token, error=str(err))
            return None

    def _damaged_noted(
        self, item: Item, fs: inboxfs.InboxFS, placed: tuple[int, bytes], sha1: str
    ) -> Item:
        """``item``, a damaged copy just put back at ``placed``, its mark completed with
        the put-back file's status and SHA-1 and noted in :attr:`damaged` (its next claim,
        the file unchanged since, is rejected damaged-copy)."""
        st = fs.lstat(*placed)
        if st is None:
            return item  # gone already: nothing to tell apart
        is_dir = stat.S_ISDIR(st.st_mode)
        try:
            status = identity_fields(fs.at(*placed)) if is_dir else stat_fields(st)
        except FileNotFoundError:
            return item
        item = item.changed(identity=damaged.noted(item, status, None if is_dir else sha1))
        self.damaged.put_back(item)
        return item

    def _discard_staged_if_configured(self, item: Item) -> None:
        """Removes the item's staged copy, when its archive is still configured there
        (else it is left, and logged: see :meth:`_leftover_staged`)."""
        if self._archive_configured(item):
            self._discard_staged(Intent.of(item), item)
        else:
            self._leftover_staged(item)

"""The claim step: take the input into the inbox's work folder (only the entry the
scan saw, walking from the inbox's descriptor), record its identity, and fix its
identifier, datatype and metadata once (the rest of its :class:`~nbankd.deposit.spec.Intent`;
the inbox's rules are read from the live configuration here, and only here).
Whether the entry may be taken, and whether what was taken is deposited, are the
pure verdicts of :mod:`nbankd.deposit.verdicts_claim` (kinds as :mod:`nbankd.filekind`
classifies them).
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import replace
from pathlib import Path

from nbankd import errors, fileflags, seams
from nbankd.archive import syncs, treeremoval
from nbankd.deposit import inboxfs, policy, rejection, verdicts_claim
from nbankd.deposit.identity import (
    MARKER_KEY,
    identity_json,
    marker_status,
    paired,
    same_marker,
    seen_matches,
    seen_tree_unchanged,
    seen_unchanged,
    sidecar_seen_matches,
    tree_now,
    with_marker,
    with_marker_status,
)
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import Outcome
from nbankd.deposit.outcomes import outcome_for
from nbankd.deposit.spec import InboxSpec, Intent
from nbankd.deposit.stepbase import StepResult, StepsBase, log
from nbankd.filekind import FileKind
from nbankd.names import MANUAL_INBOX_PREFIX, SIDECAR_SUFFIXES, printable
from nbankd.watch import writers


def _mount_inside(src: Path, where: str) -> Outcome:
    """A folder input that is a mount point or holds one waits in the inbox: its copy
    would take another filesystem's files into the archive and its removal once
    deposited reach them."""
    shown = printable(str(src / where if where else src))
    return Outcome(
        "transient",
        "mount-inside",
        f"{src} is left in the inbox: {shown} is a mount point inside the inbox "
        "(another filesystem or a bind mount), whose files are not the inbox's own to "
        "deposit and remove",
        f"unmount it, or copy the files into the inbox's own folders instead of mounting "
        f"them there; {printable(str(src))} is claimed then",
    )


class ClaimSteps(StepsBase):
    """Claiming: the input into the work folder, its identity and its plan."""

    def claim(self, item: Item) -> StepResult:
        spec = self._spec(item)
        with spec.open_fs() as fs:
            token = item.token.encode()
            if not fs.exists(fs.work, token):
                changed = self._reconfigured(item)
                if changed is not None:
                    return item, changed
                # an archive the registry does not place where it is configured: the
                # input waits where it is, untouched
                self._check_registration(item)
                resumed = False
                try:
                    item = self._note_marker(fs, item)
                    result = self._take(spec, fs, item)
                except inboxfs.Escape as err:
                    # a folder on the way was swapped for a link: nothing was taken
                    return item, Outcome("gone", "gone", err.message)
                except FileNotFoundError:
                    # a folder on the way was removed (with the input): nothing to take
                    src = spec.path / item.relpath_str
                    return item, Outcome("gone", "gone", f"{src} vanished before it was claimed")
                if result is not None:
                    return result
            else:
                resumed = True
                # replayed: the rename's fsync may have failed, or never run (a crash)
                syncs.fsync_soon(fs.work)
                claimed = fs.lstat(fs.work, token)
                # replayed after a crash that took the wrong entry: give it back
                seen = claimed is None or seen_matches(item.seen_identity, claimed)
                outcome = verdicts_claim.at_replay(seen=seen)
                if outcome is not None:
                    return item, outcome
            # the input is in the work folder: from here on it is never "gone"
            outcome = self._take_sidecar(spec, fs, item)
            if outcome is not None:
                return item, outcome
            return self._plan(spec, fs, item, resumed=resumed)

    def _note_marker(self, fs: inboxfs.InboxFS, item: Item) -> Item:
        """Before the input is taken in a ``ready: marker`` inbox: the item, its ready
        marker's status as found now noted in its scan identity (durably, when it is not
        the one its intent noted: set again since), so that a claim resumed after a
        crash past the rename knows the marker it claimed (:meth:`_claimed_identity`)
        whatever marker the next recording of the name set meanwhile."""
        if item.marker_relpath is None or item.seen_identity is None:
            return item
        seen = json.loads(item.seen_identity)
        now = marker_status(self._marker_now(fs, item))
        if MARKER_KEY in seen and same_marker(seen[MARKER_KEY], now):
            return item
        return self.journal.save(item.changed(seen_identity=json.dumps({**seen, MARKER_KEY: now})))

    @staticmethod
    def _marker_now(fs: inboxfs.InboxFS, item: Item) -> os.stat_result | None:
        """The status of the item's ready marker now (None: none, or not reachable)."""
        assert item.marker_relpath is not None
        try:
            return fs.lstat(*fs.parent(item.marker_relpath))
        except (inboxfs.Escape, FileNotFoundError, NotADirectoryError):
            return None

    def _reconfigured(self, item: Item) -> Outcome | None:
        """Before anything is taken: an outcome (the input is left in the inbox, to be
        journaled again) when a reload since the item was journaled changed where or as
        what it goes (its archive, the inbox's directories or ready mode): the claim
        decides the rest (identifier, datatype, metadata) from the configuration now,
        and an input never goes into one configuration's archive with the next one's
        datatype. Its placement and verify setting (how it is copied) stay as
        journaled."""
        live = self.inboxes(item.inbox)
        if live is None or item.kind == "unsafe" or item.inbox.startswith(MANUAL_INBOX_PREFIX):
            return None
        what = []
        if (item.archive, Path(item.archive_path)) != (live.archive_name, live.archive_path):
            what.append("archive")
        folders = live.config.folder_resources
        if (item.kind == "dir" and not folders) or (
            item.kind == "file" and folders and b"/" in item.relpath
        ):
            # a folder journaled as one input, or a file in a folder journaled on its
            # own: each is what the other folder mode makes of it
            what.append("directories")
        if (item.marker_relpath is not None) != (live.config.ready == "marker"):
            what.append("ready mode")
        if not what:
            return None
        return verdicts_claim.reconfigured(
            shown=str(live.path / item.relpath_str), what=", ".join(what)
        )

    def _take(self, spec: InboxSpec, fs: inboxfs.InboxFS, item: Item) -> StepResult | None:
        """Moves the input into the work folder, walking from the inbox folder; returns
        an outcome when it is not taken (left where it is, or put back untouched)."""
        work = fs.work
        token = item.token.encode()
        parent, name = fs.parent(item.relpath)
        src = spec.path / item.relpath_str
        st = fs.lstat(parent, name)
        folder = st is not None and item.kind == "dir" and stat.S_ISDIR(st.st_mode)
        tree = tree_now(name, dir_fd=parent) if folder else None
        outcome = verdicts_claim.at_claim(
            item_kind=item.kind,
            shown=str(src),
            found=None if st is None else FileKind.of(st),
            seen=st is not None and seen_matches(item.seen_identity, st),
            unchanged=st is not None
            and seen_unchanged(item.seen_identity, st)
            and (not folder or seen_tree_unchanged(item.seen_identity, tree)),
        )
        if outcome is not None:
            return item, outcome
        assert st is not None
        if tree is not None and tree.mounts:
            return item, _mount_inside(src, tree.mounts[0])
        if (
            item.kind != "unsafe"
            and paired(item.seen_identity)
            and self._other_sidecar(fs, parent, name, item)
        ):
            # a sidecar came (or a second one) since the intent: the input settles
            # again with it, never deposited with the sidecar left behind
            return item, verdicts_claim.sidecar_came(shown=str(src))
        if folder:
            outcome = self._cannot_empty(spec, parent, name, item, src)
            if outcome is not None:
                return item, outcome
        try:
            fs.take(
                parent,
                name,
                work,
                token,
                told=lambda err: inboxfs.write_error(
                    err,
                    f"make the move of {printable(str(src))} into the inbox's work folder "
                    f"{printable(str(spec.work_dir))} durable (the input is held there, "
                    "and claimed from there at the next attempt)",
                    [src.parent, spec.work_dir],
                ),
            )
        except FileNotFoundError:
            return item, Outcome("gone", "gone", f"{src} was taken by another process")
        except OSError as err:
            if err.errno in (errno.EXDEV, errno.EBUSY):
                # on another filesystem mounted inside the inbox, a mount point itself, or
                # in another btrfs subvolume than the work folder's: it cannot be moved
                # there; it waits where it is, told
                return item, Outcome(
                    "transient",
                    "mount-inside",
                    f"{src} is left in the inbox: it cannot be moved into the inbox's work "
                    f"folder ({err.strerror}): it is on another filesystem, mount or btrfs "
                    "subvolume than the inbox folder itself",
                    "move it onto the inbox folder's own filesystem (copy it there, then "
                    "delete this one), or unmount what is mounted inside the inbox",
                )
            if err.errno not in inboxfs.WRITE_ERRNOS:
                raise
            if not isinstance(err, PermissionError):
                # a read-only mount, a full disk: the inbox's, never the archive's;
                # nothing was taken, so it waits where it is
                return item, outcome_for(
                    inboxfs.write_error(err, f"move {src} out of {src.parent}", [src.parent])
                )
            flag = fileflags.protected_at(parent, name)
            if flag is not None:
                return item, Outcome(
                    "transient",
                    "input-protected",
                    f"cannot move {src} into the work folder: it is {flag} "
                    "(chattr: while it is set, not even root may move it)",
                    f"clear the attribute (chattr -i -a {printable(str(src))}) once it is "
                    "finished; it is claimed then",
                )
            # the inbox folder holding the file, not the archive, is the problem;
            # the file cannot be moved at all, so it waits where it is
            return item, Outcome(
                "transient",
                "inbox-not-writable",
                f"cannot move {src} out of {src.parent}: {err.strerror}",
                f"give the daemon's user write permission on {src.parent} "
                "(e.g. make it group-writable by the lab group, with the setgid bit)",
            )
        claimed = fs.lstat(work, token)
        # swapped between the check and the move: the put-back step returns it
        same = claimed is None or (claimed.st_dev, claimed.st_ino) == (st.st_dev, st.st_ino)
        outcome = verdicts_claim.after_take(shown=str(src), same_entry=same)
        if outcome is not None:
            return item, outcome
        seams.reached("after-claim-rename")
        return None

    @staticmethod
    def _cannot_empty(
        spec: InboxSpec, parent: int, name: bytes, item: Item, src: Path
    ) -> Outcome | None:
        """Before a folder input is taken: an outcome (it waits in the inbox, nothing
        registered) when it is removed from the work folder once deposited (copied or
        zipped, not published itself) and the daemon's user could not empty it (a
        sub-folder of another user's it may not write in, as ``cp -r`` under umask 022
        makes): deposited, it would stay in the work folder for ever."""
        # a folder published in place is moved into the archive, never emptied; its
        # members' modes are still changed there, which the two attributes forbid
        in_place = item.placement == "rename" and spec.config.directories != "zip"
        blocked = treeremoval.unremovable_below(
            parent, name, max_depth=writers.MAX_DEPTH, permissions=not in_place
        )
        if blocked is None:
            return None
        rel, why, flag = blocked
        where = printable(str(src / rel if rel else src))
        if flag is not None:  # immutable or append-only: no permission helps
            after = "be published" if in_place else "leave the work folder"
            return Outcome(
                "transient",
                "input-protected",
                f"{src} is left in the inbox: {where} cannot be changed or removed "
                f"({why}), so once deposited the folder could never {after}",
                f"clear the attribute (chattr -i -a {where}) once the folder is finished; "
                "it is claimed then",
            )
        return Outcome(
            "transient",
            "inbox-not-writable",
            f"{src} is left in the inbox: the daemon's user may not remove what "
            f"{where} holds ({why}), so once deposited the folder could never leave the "
            "work folder",
            f"give the daemon's user write permission on {where} and the folders in it "
            "(e.g. chmod -R g+w with the lab group), or move the folder out",
        )

    @staticmethod
    def _other_sidecar(fs: inboxfs.InboxFS, parent: int, name: bytes, item: Item) -> bool:
        """True when a sidecar name of the input holds something (not a folder) other
        than the sidecar journaled with it."""
        journaled = os.path.basename(item.sidecar_relpath) if item.sidecar_relpath else None
        for suffix in SIDECAR_SUFFIXES:
            car = name + os.fsencode(suffix)
            if car == journaled:
                continue
            try:
                st = fs.lstat(parent, car)
            except OSError:  # a name too long to be one (255 bytes): there is none
                continue
            if st is not None and not stat.S_ISDIR(st.st_mode):
                return True
        return False

    def _take_sidecar(self, spec: InboxSpec, fs: inboxfs.InboxFS, item: Item) -> Outcome | None:
        """Moves the input's sidecar next to it, when it is still the one the scan saw
        settle (else an outcome: the input goes back and settles again); one that cannot
        be reached (its folder gone or swapped for a link) counts as absent."""
        side_token = rejection.sidecar_work_name(item)
        if item.sidecar_relpath is None or side_token is None:
            return None
        shown = str(spec.path / os.fsdecode(item.sidecar_relpath))
        try:
            side_parent, side_name = fs.parent(item.sidecar_relpath)
            taken = fs.lstat(fs.work, side_token)
            if taken is not None:  # taken before a crash: the one checked, if it was
                same = sidecar_seen_matches(item.seen_identity, taken, moved=True)
                return verdicts_claim.sidecar_at_claim(shown=shown, same=same)
            st = fs.lstat(side_parent, side_name)
            outcome = verdicts_claim.sidecar_at_claim(
                shown=shown, same=sidecar_seen_matches(item.seen_identity, st)
            )
            if outcome is not None or st is None:
                return outcome
            fs.take(
                side_parent,
                side_name,
                fs.work,
                side_token,
                told=lambda err: inboxfs.write_error(
                    err,
                    f"make the move of the sidecar {printable(shown)} into the inbox's work "
                    f"folder {printable(str(spec.work_dir))} durable",
                    [Path(shown).parent, spec.work_dir],
                ),
            )
            # swapped between the check and the move: the put-back step returns both
            taken = fs.lstat(fs.work, side_token)
            same = taken is not None and (taken.st_dev, taken.st_ino) == (st.st_dev, st.st_ino)
            return verdicts_claim.sidecar_at_claim(shown=shown, same=same)
        except FileNotFoundError:  # removed since the check (or its folder was)
            outcome = verdicts_claim.sidecar_at_claim(
                shown=shown, same=sidecar_seen_matches(item.seen_identity, None)
            )
            if outcome is not None:
                return outcome
            log.warning("sidecar not reachable; deposited without it", item=item.token)
        except (inboxfs.Escape, NotADirectoryError):
            log.warning("sidecar not reachable; deposited without it", item=item.token)
        return None

    def _plan(
        self, spec: InboxSpec, fs: inboxfs.InboxFS, item: Item, *, resumed: bool
    ) -> StepResult:
        """Records the claimed input's identity and decides its identifier and metadata
        (``resumed``: the input was in the work folder already, taken by an earlier
        attempt)."""
        is_dir = item.kind == "dir"
        work = fs.at(fs.work, item.token)
        side_name = rejection.sidecar_work_name(item)
        sidecar_work = fs.at(fs.work, side_name) if side_name is not None else None
        if item.kind == "unsafe":
            # a symlink, hard link, FIFO, socket or device: moved by name, never opened
            return item, verdicts_claim.unsafe_claimed(json.loads(item.reason_json or "{}"))
        if item.identity is None:
            identity = self._claimed_identity(fs, item, work, is_dir, resumed=resumed)
            item = item.changed(identity=identity)
        # a symlink, FIFO or device swapped in before the rename is never read
        st = os.lstat(work)
        outcome = verdicts_claim.when_claimed(
            item_kind=item.kind, relpath=item.relpath_str, found=FileKind.of(st), size=st.st_size
        ) or self.damaged.judge(item, str(spec.path / item.relpath_str), work)
        if outcome is not None:
            return item, outcome
        try:
            archive = self._archive(Intent.of(item))  # the archive journaled for it
            sidecar = self._read_sidecar(item, sidecar_work)
            rules = spec.rules(
                auto_identifiers=archive.policy.auto_identifiers,
                auto_id_type=archive.policy.auto_id_type,
                keep_extensions=archive.policy.keep_extensions,
                allow_directories=archive.policy.allow_directories,
            )
            # a folder deposited as its zip is named as nbank names it: the folder's
            # stem, stored with the extension .zip (a file: no directory policy)
            zipped = is_dir and spec.config.directories == "zip"
            plan = policy.plan(
                item.relpath_str,
                rules,
                sidecar,
                token=item.token_bytes,
                is_dir=is_dir and not zipped,
            )
        except (errors.NbankdError, OSError) as err:
            return item, outcome_for(err)
        target = plan.target_name
        if zipped:
            target = plan.name + ".zip" if archive.policy.keep_extensions else plan.name
        item = replace(
            item,
            name=plan.name,
            dtype=plan.dtype,
            metadata_json=plan.metadata_json,
            target_name=target,
            auto_id=plan.auto,
            zipped=zipped,
            # a zip is a new file: always staged and published as a copy
            placement="copy" if zipped else item.placement,
            # a folder resource as it is has no reader (nbank zips folders to read them)
            file_metadata="skip" if is_dir and not zipped else spec.config.file_metadata,
        )
        seams.reached("after-claim")
        return item, Outcome.ok()

    @classmethod
    def _claimed_identity(
        cls, fs: inboxfs.InboxFS, item: Item, work: Path, is_dir: bool, *, resumed: bool
    ) -> str:
        """The identity journaled at claim: the input's, and in a ``ready: marker`` inbox
        its marker's as found now, the input gone from the inbox (none when it cannot
        be reached): the release removes only that marker, never one set again since for
        the next recording of the name. A claim ``resumed`` (cut short past its rename:
        the rig may have recorded the name again meanwhile, and set its marker) takes
        the marker noted before the rename (:meth:`_note_marker`), when one was; when
        none was (journaled by an older release), a marker set after the item was
        journaled is the next recording's: none is taken, and the release leaves it."""
        identity = identity_json(work, is_dir)
        if item.marker_relpath is None:
            return identity
        seen = json.loads(item.seen_identity or "{}")
        if resumed and MARKER_KEY in seen:
            return with_marker_status(identity, seen[MARKER_KEY])
        now = cls._marker_now(fs, item)
        if resumed and now is not None and now.st_mtime > item.created:
            log.warning(
                "ready marker set after the input was journaled, left for the next "
                "recording of the name (a claim of an earlier version cut short)",
                item=item.token,
            )
            now = None
        return with_marker(identity, now)

    def _read_sidecar(self, item: Item, path: Path | None) -> policy.Sidecar:
        if path is None or not os.path.lexists(path):
            return policy.Sidecar()
        source = os.fsdecode(item.sidecar_relpath or b"")
        st = os.lstat(path)  # a link, FIFO or device is refused before it is ever opened
        policy.check_sidecar_entry(st.st_mode, st.st_nlink, source=source)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            policy.check_sidecar_entry(st.st_mode, st.st_nlink, source=source)
            raw = f.read(policy.SIDECAR_MAX_BYTES + 1)
        return policy.parse_sidecar(
            policy.sidecar_text(raw, source=source),
            json_format=path.suffix == ".json",
            source=source,
        )

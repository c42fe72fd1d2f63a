"""The claim step: take the input into the inbox's work folder (only the entry the
scan saw, walking from the inbox's descriptor), record its identity, and fix its
identifier, datatype and metadata once.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import replace
from pathlib import Path

from nbankd import errors, seams
from nbankd.deposit import inboxfs, policy, rejection
from nbankd.deposit.identity import identity_json, seen_matches
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import Outcome
from nbankd.deposit.outcomes import outcome_for
from nbankd.deposit.spec import InboxSpec
from nbankd.deposit.stepbase import StepResult, StepsBase, log


class ClaimSteps(StepsBase):
    """Claiming: the input into the work folder, its identity and its plan."""

    def claim(self, item: Item) -> StepResult:
        spec = self._spec(item)
        with spec.open_fs() as fs:
            token = item.token.encode()
            if not fs.exists(fs.work, token):
                try:
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
                claimed = fs.lstat(fs.work, token)
                if claimed is not None and not seen_matches(item.seen_identity, claimed):
                    # replayed after a crash that took the wrong entry: give it back
                    return item, Outcome(
                        "changed", "changed", "not the entry the scan saw; putting it back"
                    )
            # the input is in the work folder: from here on it is never "gone"
            self._take_sidecar(spec, fs, item)
            return self._plan(spec, fs, item)

    def _take(self, spec: InboxSpec, fs: inboxfs.InboxFS, item: Item) -> StepResult | None:
        """Moves the input into the work folder, walking from the inbox folder; returns
        an outcome when it is not taken (left where it is, or put back untouched)."""
        work = fs.work
        token = item.token.encode()
        is_dir = item.kind == "dir"
        parent, name = fs.parent(item.relpath)
        src = spec.path / item.relpath_str
        st = fs.lstat(parent, name)
        if st is None:
            return item, Outcome("gone", "gone", f"{src} vanished before it was claimed")
        ok_kind = stat.S_ISDIR(st.st_mode) if is_dir else stat.S_ISREG(st.st_mode)
        unsafe = item.kind == "unsafe"
        if not unsafe and (not ok_kind or (not is_dir and st.st_nlink > 1)):
            return item, Outcome("gone", "unsupported", f"{src} is no longer a plain input")
        if not seen_matches(item.seen_identity, st):
            return item, Outcome(
                "gone", "gone", f"{src} is not the entry the scan saw (replaced); left alone"
            )
        try:
            fs.take(parent, name, work, token)
        except FileNotFoundError:
            return item, Outcome("gone", "gone", f"{src} was taken by another process")
        except PermissionError as err:
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
        if claimed is not None and (claimed.st_dev, claimed.st_ino) != (st.st_dev, st.st_ino):
            # swapped between the check and the move: the put-back step returns it
            return item, Outcome(
                "changed", "changed", f"{src} changed while it was claimed; putting it back"
            )
        seams.reached("after-claim-rename")
        return None

    def _take_sidecar(self, spec: InboxSpec, fs: inboxfs.InboxFS, item: Item) -> None:
        """Moves the input's sidecar next to it; one that cannot be reached (its folder
        gone or swapped for a link) counts as absent, as one deleted would."""
        side_token = rejection.sidecar_work_name(item)
        if item.sidecar_relpath is None or side_token is None:
            return
        try:
            side_parent, side_name = fs.parent(item.sidecar_relpath)
            if fs.exists(side_parent, side_name) and not fs.exists(fs.work, side_token):
                fs.take(side_parent, side_name, fs.work, side_token)
        except (inboxfs.Escape, FileNotFoundError, NotADirectoryError):
            log.warning("sidecar not reachable; deposited without it", item=item.token)

    def _plan(self, spec: InboxSpec, fs: inboxfs.InboxFS, item: Item) -> StepResult:
        """Records the claimed input's identity and decides its identifier and metadata."""
        is_dir = item.kind == "dir"
        work = fs.at(fs.work, item.token)
        side_name = rejection.sidecar_work_name(item)
        sidecar_work = fs.at(fs.work, side_name) if side_name is not None else None
        if item.kind == "unsafe":
            # a symlink, hard link, FIFO, socket or device: moved by name, never opened
            reason = json.loads(item.reason_json or "{}")
            return item, Outcome(
                "permanent",
                reason.get("code", "unsupported"),
                reason.get("message", "not a regular file"),
                reason.get("hint", ""),
            )
        item = replace(item, identity=item.identity or identity_json(work, is_dir))
        # a symlink, FIFO or device swapped in before the rename is never read
        st = os.lstat(work)
        if not (stat.S_ISDIR(st.st_mode) if is_dir else stat.S_ISREG(st.st_mode)):
            return item, Outcome("permanent", "unsupported", "not a regular file when claimed")
        if not is_dir and st.st_size == 0:
            return item, Outcome(
                "permanent",
                "empty",
                f"{item.relpath_str!r} has zero bytes",
                "an empty recording is almost always a failed acquisition; "
                "check the rig and requeue if it is meant to be empty",
            )
        try:
            archive = self._archive(spec)
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

"""The thin I/O shell of the deposit life cycle: one function per step.

Each step reads the item, does its I/O, and returns the updated item with an
:class:`~nbankd.deposit.lifecycle.Outcome`; :class:`Runner` persists the result
through :func:`~nbankd.deposit.lifecycle.advance`. Every step is idempotent:
after a crash the same step runs again from the journaled state and finds its
own earlier work (a renamed file, a staged copy, a registry record, a link).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from nbankd import errors, seams
from nbankd.archive import durable, fsops, layout
from nbankd.deposit import receipts, verdicts, verdicts_readback
from nbankd.deposit.claim import ClaimSteps
from nbankd.deposit.identifiers import IdentifierSteps
from nbankd.deposit.identity import (
    mark_verified,
    reidentified,
    staged_matches,
    verified_before_publish,
)
from nbankd.deposit.inboxfs import MANUAL_TAMPERED_HINT, Tampered
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import DURABLE, Outcome, State, Step, advance, next_step
from nbankd.deposit.outcomes import outcome_for
from nbankd.deposit.release import ReleaseSteps
from nbankd.deposit.spec import InboxSpec, Intent
from nbankd.deposit.stage import StageSteps
from nbankd.deposit.stepbase import InboxParked, StepResult, log
from nbankd.names import MANUAL_INBOX_PREFIX
from nbankd.timefmt import iso

_PROC_FD = re.compile(r"/proc/self/fd/\d+")

__all__ = ["InboxParked", "StepResult", "Steps"]


class Steps(ClaimSteps, StageSteps, IdentifierSteps, ReleaseSteps):
    """Executes deposit steps for items of known inboxes."""

    def publish(self, item: Item) -> StepResult:
        spec, intent = self._spec(item), Intent.of(item)
        archive = self._archive(intent)
        if item.already:  # nothing to store: the stored copy is read back by verify
            self._discard_staged(intent, item)
            return item, Outcome.ok()
        try:
            return self._publish(spec, intent, archive, item)
        except errors.StoredUnderOtherName as err:
            if self._refiled_legacy(archive, item, Path(err.stored)):
                return self._publish(spec, intent, archive, item)
            facts = replace(
                self._facts(item, archive, None),
                registered=item.progress.registered,
                stored=(err.stored,),
                stored_sha1=self._stored_sha1(Path(err.stored)),
            )
            return self._act(item, verdicts.at_publish(facts))

    def _refiled_legacy(
        self, archive: layout.Archive, item: Item, stored: Path | None = None
    ) -> bool:
        """Moves this item's own copy, published by an older nbankd under the stub of
        its stored name (``resources/a./a.json``), to where its identifier belongs;
        True if it did. ``stored``: the entry publishing found (another one: False)."""
        assert item.name and item.target_name
        legacy = archive.resources_dir / item.target_name[:2] / item.target_name
        if legacy.parent.name == item.name[:2] or stored not in (None, legacy):
            return False  # not a one-character identifier's older place, or another file
        if not item.progress.registered or not os.path.lexists(legacy):
            return False  # not this item's: only a registered item may have published
        durable.refile(archive, legacy, item.name)
        log.info("moved an older deposit where its identifier belongs", path=str(legacy))
        return True

    def _publish(
        self, spec: InboxSpec, intent: Intent, archive: layout.Archive, item: Item
    ) -> StepResult:
        """Publishes the staged copy (or, placed by rename, the claimed input itself:
        reached through the live inbox folder, ``spec``) at the intent's target."""
        target = self._target(archive, item)
        if intent.placement == "rename":
            with spec.open_fs() as fs:
                work = fs.at(fs.work, item.token)
                as_hashed = self._content_as_hashed(item, work)
                if as_hashed is None:
                    return self._withdraw(intent, item, work, target)
                if isinstance(as_hashed, tuple):  # not now: tried again later
                    return as_hashed
                item = as_hashed
                published = durable.publish_in_place(
                    archive, work, target, sha1=item.sha1, id=item.name, progress=self._progress
                )
                if not published.ours:  # stored first by another input (another rig)
                    log.info("already deposited", item=item.token, resource_id=item.name)
                    # publishing gave the input the archive's mode and group: its identity
                    # now, so that a copy found bad at its read-back is staged again from
                    # it, not taken for a changed input
                    item = item.changed(
                        already=True, identity=reidentified(item.identity, work, item.kind == "dir")
                    )
        else:
            staged = archive.staging_dir / self.staged_name(item)
            staged_exists = os.path.lexists(staged)
            found = verdicts_readback.Staged(
                shown=str(staged),
                relpath=item.relpath_str,
                staged_exists=staged_exists,
                target_exists=os.path.lexists(target),
                # not the copy this process journaled: never published, made again
                staged_ours=staged_exists and staged_matches(item.staged_identity, staged),
                verify=intent.verify,
            )
            outcome = verdicts_readback.before_publish(found)
            if outcome is not None:
                return item, outcome
            if verdicts_readback.reads_staged(found):
                # read back from storage before it becomes visible in resources/: a bad
                # copy is never published, only made again
                assert item.sha1
                # the stage step's fsync of this copy succeeded before STAGED was saved:
                # its pages are clean, read back without another flush of the disk
                matches = durable.verify_from_storage(
                    staged, item.sha1, throttle=self._progress, synced=True
                )
                after = verdicts_readback.after_read_back(
                    verdicts_readback.ReadBack.STAGED,
                    matches=matches,
                    placement=intent.placement,
                    shown=item.relpath_str,
                    staged_identity=item.staged_identity is not None,
                )
                if after.discard:
                    durable.discard_staged(archive, staged)
                if after.outcome.kind != "ok":
                    return item, after.outcome
                if after.mark_verified and item.staged_identity is not None:
                    item = item.changed(staged_identity=mark_verified(item.staged_identity))
            published = durable.publish(archive, staged, target, sha1=item.sha1, id=item.name)
            if not published.ours:
                # another input with this identifier, bytes and name was stored first:
                # this one is already deposited (its input leaves after the read-back)
                log.info("already deposited", item=item.token, resource_id=item.name)
                item = item.changed(already=True)
        seams.reached("after-publish")
        return item, Outcome.ok()

    def verify(self, item: Item) -> StepResult:
        self._spec(item)  # parked if its archive is no longer configured there
        intent = Intent.of(item)
        before = False  # this inode was read back from storage and matched before publish
        if not item.already and intent.verify:
            archive = self._archive(intent)
            target = self._target(archive, item)
            if not os.path.lexists(target):
                self._refiled_legacy(archive, item)
            before = verified_before_publish(item.staged_identity, target)
        if (
            not item.already
            and item.kind == "dir"
            and intent.placement == "rename"
            and item.staged_identity is not None
        ):
            # staged as a copy by a release that published the folder itself without
            # flushing it: flushed here, whatever the verify setting; that copy goes
            archive = self._archive(intent)
            durable.fsync_published_tree(self._target(archive, item))
            self._discard_staged(intent, item)
        # an input already deposited goes once the copy found is read back: gone or
        # changed since the lookup (another input's verify removed a bad one), it is kept
        where = verdicts_readback.verify_reads(
            already=item.already, verify=intent.verify, verified_before_publish=before
        )
        if where is not None:
            archive = self._archive(intent)
            target = self._target(archive, item)
            assert item.sha1
            # our published copy was fsynced (staged, or in place before its link); a
            # copy found stored by another deposit is flushed before it is read
            synced = where is verdicts_readback.ReadBack.PUBLISHED
            matches = durable.verify_from_storage(
                target, item.sha1, throttle=self._progress, synced=synced
            )
            after = verdicts_readback.after_read_back(
                where,
                matches=matches,
                placement=intent.placement,
                shown=str(item.name) if where is verdicts_readback.ReadBack.FOUND else str(target),
            )
            if after.discard:
                fsops.remove_ours(target)
                durable.fsync_dir(target.parent)
            if after.not_already:
                item = item.changed(already=False)
            if after.outcome.kind != "ok":
                return item, after.outcome
        seams.reached("after-verify")
        return item, Outcome.ok()

    def record(self, item: Item) -> StepResult:
        spec, intent = self._spec(item), Intent.of(item)
        assert intent.target is not None
        now = self.clock()
        # the inbox as people know it: its folder (spec.key), never the journal's key,
        # which for a manual deposit is its options as JSON (intent.inbox)
        receipt = {
            "token": item.token,
            "source": str(spec.path / item.relpath_str),
            "inbox": spec.key,
            "id": intent.identifier,
            "url": item.url,
            "sha1": item.sha1,
            "size": item.size,
            "dtype": intent.dtype,
            "archive": intent.archive_name,
            "archive_path": str(intent.target),
            "time": iso(now),
            "outcome": "already-deposited" if item.already else "deposited",
        }
        if item.zipped:
            receipt["zipped"] = True  # as nbank's deposit record says of a zipped folder
        # retried (a failed fsync among its earlier attempts?): a receipt is trusted as
        # written only as read back from storage
        # the first record step of an item this process journaled: no receipt to look for
        first = self.journal.first_record(item)
        try:
            receipts.append_receipt(
                self.receipts_dir, spec.key, receipt, retried=item.attempts > 0, first=first
            )
        except OSError as err:  # state_dir's problem, never the archive's: say so
            if errors.process_limit_problem(err, "writing a receipt") is not None:
                raise  # the process short of descriptors: told as such by outcome_for
            where = err.filename or self.receipts_dir  # the log, when it is at fault
            hint = (
                f"remove {where} ({err.noun}, not the log) or put the receipts log back "
                "in its place; the receipt is written and the deposit finishes then"
                if isinstance(err, fsops.NotALog)
                else f"make {self.receipts_dir} and its logs writable by nbankd's user "
                "again (owner, mode, chattr -i, free space); the deposit finishes then"
            )
            return item, Outcome(
                "transient",
                "receipts-unwritable",
                f"cannot write the receipt of {item.relpath_str!r} into {where}: "
                f"{err.strerror or err}",
                hint,
            )
        seams.reached("after-receipt-append")
        return item.changed(finished=now), Outcome.ok()

    # -- dispatch ----------------------------------------------------------------

    def run(self, item: Item, step: Step) -> StepResult:
        fn = {
            Step.CLAIM: self.claim,
            Step.STAGE: self.stage,
            Step.LOOKUP: self.lookup,
            Step.REGISTER: self.register,
            Step.PUBLISH: self.publish,
            Step.VERIFY: self.verify,
            Step.RECORD: self.record,
            Step.RELEASE: self.release,
            Step.REJECT: self.reject,
            Step.PUT_BACK: self.put_back,
        }[step]
        try:
            followed = self.follow_archive(item, step)
            if isinstance(followed, tuple):  # decided again: its input goes back
                return followed
            item = followed  # journaled with the step, whatever it concludes
            item, outcome = fn(item)
        except (errors.NbankdError, OSError) as err:
            outcome = outcome_for(err)
        except Exception as err:  # a bug: the input waits with backoff instead of looping hot
            log.exception("unexpected error in a deposit step", item=item.token, step=str(step))
            outcome = Outcome(
                "transient",
                "internal",
                f"unexpected error in step {step}: {err!r}",
                "this is a bug in nbankd: please report it with the log; the input is kept",
            )
        if "/proc/self/fd/" in outcome.message or item.token in outcome.message:
            outcome = replace(outcome, message=self._told_in_inbox(item, outcome.message))
        return item, outcome

    def _told_in_inbox(self, item: Item, message: str) -> str:
        """``message`` with paths through an open folder named: the claimed input in the
        work folder as the input's own path in its inbox (what a user finds and
        requeues), anything else in the work folder by the work folder's path."""
        spec = self.inboxes(item.inbox)
        if spec is None:
            return _PROC_FD.sub("the work folder", message)
        # the token itself, then a "/" or the path's end (never TOKEN.sidecar.yaml, the
        # sidecar's name in the work folder, which is no path of the input's)
        token = re.escape(item.token) + r"(?![\w.-])"
        claimed = re.compile(
            "(?:/proc/self/fd/\\d+|" + re.escape(str(spec.work_dir)) + ")/" + token
        )
        shown = str(spec.path / item.relpath_str)
        message = claimed.sub(lambda _: shown, message)
        return _PROC_FD.sub(lambda _: str(spec.work_dir), message)

    def drive(
        self, item: Item, *, until_blocked: bool = True, on_step: Callable[[], None] | None = None
    ) -> Item:
        """Runs steps for ``item`` until it is final or must wait; returns the saved item.

        ``on_step`` is called before each step and while bytes move (the daemon's
        liveness heartbeat).
        """
        self.set_beat(on_step)
        while True:
            now = self.clock()
            step = next_step(item.progress, now)
            if step is None:
                return item
            if on_step is not None:
                on_step()
            item, outcome = self.attempt(item, step)
            item = self.journal.save(item, durable=item.state in DURABLE)
            self.saved(item, step, outcome)
            if not until_blocked or not keeps_going(outcome):
                return item

    def attempt(self, item: Item, step: Step) -> StepResult:
        """Runs ``step`` of ``item``: the item to save after it (its new progress), and
        the outcome. Saving is the caller's: alone (:meth:`drive`) or with other items'
        saves in one transaction (:mod:`nbankd.deposit.rounds`)."""
        item, outcome = self.run(item, step)
        if outcome.code == Tampered.code and item.inbox.startswith(MANUAL_INBOX_PREFIX):
            # a manual deposit's next try makes its folder again: no nbankd to restart
            outcome = replace(outcome, hint=MANUAL_TAMPERED_HINT)
        return self.judged(item, step, outcome), outcome

    def judged(self, item: Item, step: Step, outcome: Outcome) -> Item:
        """``item`` at the progress ``outcome`` of ``step`` gives it (a backoff after a
        failure, the next state after success), ready to save."""
        progress = advance(item.progress, step, outcome, self.clock(), self.rng)
        changes: dict[str, object] = {"updated": self.clock()}
        if progress.error_code is None:
            if item.error_hint is not None:
                changes["error_hint"] = None
        elif progress.error_message == outcome.message and outcome.kind != "ok":
            # this outcome's error: what to do about it is kept beside it (the error of an
            # earlier step carried on, as after a bad read-back, keeps its own)
            changes["error_hint"] = outcome.hint or None
        if progress.state is State.REJECTING and item.reason_json is None:
            reason = {"code": outcome.code, "message": outcome.message, "hint": outcome.hint}
            changes["reason_json"] = json.dumps(reason)
        return item.with_progress(progress, **changes)

    @staticmethod
    def saved(item: Item, step: Step, outcome: Outcome) -> None:
        """What follows a step's save: its crash point and its log line."""
        if item.state is State.RECORDED:
            seams.reached("after-record")
        _log_transition(item, step, outcome)


def keeps_going(outcome: Outcome) -> bool:
    """True when the item's next step may run at once after this outcome."""
    return outcome.kind in _KEEP_GOING


#: outcomes after which a worker goes on with the item's next step at once
_KEEP_GOING = frozenset(
    {"ok", "permanent", "changed", "restage", "renamed", "superseded", "withdrawn", "redecide"}
)


def _log_transition(item: Item, step: Step, outcome: Outcome) -> None:
    fields = {"inbox": item.inbox, "item": item.token, "resource_id": item.name, "step": str(step)}
    if outcome.kind == "ok":
        if item.state is State.DONE:
            log.info("deposited", source=item.relpath_str, url=item.url, sha1=item.sha1, **fields)
        elif item.state is State.REJECTED:
            reason = json.loads(item.reason_json or "{}")
            log.warning(
                "rejected",
                source=item.relpath_str,
                code=reason.get("code"),
                reason=reason.get("message"),
                rejected_path=reason.get("rejected_path"),
                **fields,
            )
        else:
            log.debug("step done", state=str(item.state), **fields)
    elif outcome.kind in ("transient",):
        log.warning(
            "step failed; will retry",
            code=outcome.code,
            error=outcome.message,
            hint=outcome.hint or None,
            attempts=item.attempts,
            retry_in=round(item.not_before - time.time(), 1),
            **fields,
        )
    else:
        log.info(
            "step outcome", outcome=outcome.kind, code=outcome.code, error=outcome.message, **fields
        )

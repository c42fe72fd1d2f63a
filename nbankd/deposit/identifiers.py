"""The lookup and register steps: the facts about an input's identifier gathered
from the registry and the archive, judged by :mod:`nbankd.deposit.verdicts`.

The registry is asked before registering only when the archive already holds an
entry for the identifier (the verdict then depends on the record); otherwise the
registering request is the question, and a refusal is classified after it
(:func:`~nbankd.deposit.verdicts.at_register`), so a new input costs one request.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from pathlib import Path

from nbankd import errors, seams
from nbankd.archive import layout
from nbankd.archive.verify import stored_sha1
from nbankd.deposit import policy, verdicts
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import Outcome
from nbankd.deposit.spec import Intent
from nbankd.deposit.stepbase import StepResult, StepsBase, log
from nbankd.registry.base import ResourceRecord, metadata_as_stored


class IdentifierSteps(StepsBase):
    """Lookup and registration: what the input's identifier may become."""

    def lookup(self, item: Item) -> StepResult:
        self._spec(item)  # parked if its archive is no longer configured there
        self._check_registration(item)  # never checked in an archive the registry misplaces
        archive = self._archive(Intent.of(item))
        item = item.changed(already=False)  # decided again on every lookup
        assert item.name
        stored = archive.stored_entries(item.name, known=self._lookup_known())
        recheck = item.error_code in verdicts.RECHECK_CODES  # judged again by the registry
        if not stored and not item.progress.registered and not recheck:
            # nothing is stored for this identifier: the registry is asked by the
            # registering POST itself, whose refusals (name or SHA-1 taken) are exact and
            # judged then (at_register): one request per input in the common case
            seams.reached("after-lookup")
            return item, Outcome.ok()
        facts = self._facts(item, archive, self.registry.get_resource(item.name))
        facts = self._with_holders(facts, archive)
        # the entry where this input would go is the one judged, when there is one
        ordered = sorted((str(p) for p in stored), key=lambda p: p != facts.target)
        facts = replace(facts, stored=tuple(ordered))
        if verdicts.needs_stored_sha1(facts):
            facts = replace(facts, stored_sha1=self._stored_sha1(Path(facts.stored[0])))
        item, outcome = self._act(item, verdicts.at_lookup(facts))
        if outcome.kind == "ok":
            seams.reached("after-lookup")
        return item, outcome

    def _facts(
        self, item: Item, archive: layout.Archive, record: ResourceRecord | None
    ) -> verdicts.Facts:
        """What the registry's record for the item's identifier says about it."""
        assert item.name and item.sha1 and item.target_name
        matches = record is not None and record.dtype == item.dtype
        if matches and record is not None:
            ours = json.loads(item.metadata_json or "{}")
            matches = metadata_as_stored(ours, record.metadata)
        return verdicts.Facts(
            name=item.name,
            sha1=item.sha1,
            target=str(self._target(archive, item)),
            auto=item.auto_id,
            registered=item.progress.registered,
            has_record=record is not None,
            record_matches=matches,
            record_sha1=(record.sha1 or "").lower() if record is not None else None,
        )

    def _with_holders(self, facts: verdicts.Facts, archive: layout.Archive) -> verdicts.Facts:
        """The facts with the records holding the input's SHA-1, and whether this
        archive stores an entry for the first of them that is not the input's own."""
        holders = tuple(r.name for r in self.registry.search(sha1=facts.sha1))
        others = [h for h in holders if h != facts.name]
        stored = True
        if others:
            try:
                stored = bool(archive.stored_entries(others[0], known=self._lookup_known()))
            except errors.InvalidIdentifier:  # a name this archive cannot file
                stored = False
        return replace(facts, holders=holders, holder_stored=stored)

    def _stored_sha1(self, path: Path) -> str:
        """The SHA-1 of a stored file or folder, read back from storage."""
        digest = stored_sha1(path, throttle=self._progress)
        return digest if digest is not None else "(a symbolic link, or gone)"

    def _act(self, item: Item, verdict: verdicts.Verdict) -> StepResult:
        """The outcome of a verdict on the item's identifier (a replaced automatic
        identifier is journaled with the outcome that sends it to lookup again)."""
        kind = verdict.kind
        if kind is verdicts.Kind.PROCEED:
            return item, Outcome.ok()
        if kind is verdicts.Kind.ALREADY:
            log.info("already deposited", item=item.token, resource_id=item.name)
            return item.changed(already=True), Outcome.ok()
        if kind is verdicts.Kind.RECHECK:
            return item, Outcome("recheck", verdict.code, verdict.message, verdict.hint)
        if kind is verdicts.Kind.RENAME:
            assert item.name and item.target_name
            if item.progress.registered:  # a record may carry this name: it stays
                return item, Outcome("transient", "internal", f"{verdict.message} (registered)")
            archive = self._archive(Intent.of(item))
            name = policy.replacement_identifier(
                item.token_bytes, item.name, archive.policy.auto_id_type
            )
            suffix = item.target_name[len(item.name) :]
            log.warning(
                "automatic identifier taken; replaced",
                item=item.token,
                taken=item.name,
                resource_id=name,
                reason=verdict.message,
            )
            item = item.changed(name=name, target_name=name + suffix)
            return item, Outcome("renamed", verdict.code, f"{verdict.message}; now {name}")
        kind_name = "superseded" if kind is verdicts.Kind.SUPERSEDED else "permanent"
        return item, Outcome(kind_name, verdict.code, verdict.message, verdict.hint)

    def _locate(self, name: str, archive: str) -> None:
        """Adds the record's location in ``archive``; one another process added since
        the record was read is just as good (the registry locates it either way)."""
        with contextlib.suppress(errors.LocationTaken):
            self.registry.add_location(name, archive)

    def register(self, item: Item) -> StepResult:
        self._spec(item)  # parked if its archive is no longer configured there
        self._check_registration(item)  # never registered where the registry misplaces it
        intent = Intent.of(item)
        assert item.name and item.dtype and item.sha1 and item.target_name
        if item.already:  # the record is there: only this archive's location may be new
            record = self.registry.get_resource(item.name)
            if record is not None and (record.sha1 or "").lower() == item.sha1:
                if intent.archive_name not in record.locations:
                    self._locate(item.name, intent.archive_name)
                return item.changed(url=self.registry.resource_url(item.name)), Outcome.ok()
            item = item.changed(already=False)  # the record went since: register it
        try:
            self.registry.add_resource(
                dtype=item.dtype,
                archive=intent.archive_name,
                name=item.name,
                sha1=item.sha1,
                metadata=json.loads(item.metadata_json or "{}"),
            )
            seams.reached("after-register-request")
        except (errors.NameTaken, errors.Sha1Taken):
            # ours already if an earlier attempt's answer was lost; else whose it is
            archive = self._archive(intent)
            record = self.registry.get_resource(item.name)
            if record is None and self._registering_together():
                # another record's bytes: the verdict looks into the archive, which is
                # never done while the batch holds the registry's write lock
                return self._act(item, verdicts.held_elsewhere(item.name))
            facts = self._facts(item, archive, record)
            if record is None:
                facts = self._with_holders(facts, archive)
            item, outcome = self._act(item, verdicts.at_register(facts))
            if outcome.kind != "ok":
                return item, outcome
            assert record is not None
            if intent.archive_name not in record.locations:
                self._locate(item.name, intent.archive_name)
        item = item.changed(url=self.registry.resource_url(item.name))
        self._registered(item)
        return item, Outcome.ok()

"""What the deposit steps know of an input's inbox: the intent the journal fixed for
the item, and the inbox's run-time view.

An :class:`Intent` is everything decided for one input, read from its journal row
and never from the live configuration: the inbox (its key), the relative path, the
archive's name and path, the placement and verify setting (journaled when the item
was journaled), and the identifier, datatype, metadata and stored name, hence the
target path (fixed by the claim step). A reload that re-points the inbox at another
archive, or changes its placement or verify setting, does not re-route an item in
flight.

An :class:`InboxSpec` is the inbox's parsed configuration (held, never copied
field by field) plus what only the running daemon knows: the archive it was
resolved to, the configuration file's path for hints, and the identities of its
work and rejected folders recorded at start. Frozen, so a reload swaps whole
records instead of mutating shared state under running workers. A few values are
deliberately taken from it, live, for an item in flight:

- the inbox folder itself, opened through :meth:`InboxSpec.open_fs` (it is the
  folder the item's inbox key names) with its work folder;
- ``rejected_dir``: a rejection goes where the administrator looks *now* (a reload
  that moves the rejected folder moves where later rejections land);
- ``config_source``: the configuration file named in a reason's requeue command is
  the one the daemon runs with now;
- ``key`` (the inbox's folder, as text) in a receipt and for its receipts file: the
  journal's key (:attr:`Intent.inbox`) of a manual deposit is its options as JSON;
- at the claim step only, the inbox's rules (datatype, metadata, directories,
  file_metadata): claiming is where they are decided, then journaled in the intent.

:meth:`nbankd.deposit.stepbase.StepsBase._spec` returns the live spec with the
intent's archive, placement and verify setting laid over it (:meth:`Intent.fix`),
so code that still reads them from a spec reads the journaled values.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from nbankd.archive.layout import stored_file
from nbankd.config.model import ArchiveConfig, InboxConfig
from nbankd.deposit.inboxfs import InboxFS
from nbankd.deposit.journal import Item
from nbankd.deposit.policy import InboxRules
from nbankd.names import WORK_DIR_NAME


@functools.lru_cache(maxsize=64)
def _archive_path(text: str) -> Path:
    """The journaled archive path as a Path, made once per path (every step of every
    item asks for its intent)."""
    return Path(text)


@dataclass(frozen=True)
class Intent:
    """What the journal fixed for one input, never re-read from the configuration."""

    inbox: str  # the inbox's key: its path as text (a manual deposit's: its options)
    relpath: bytes  # the input's path in the inbox, raw bytes
    archive_name: str
    archive_path: Path
    placement: str  # "copy" or "rename"
    verify: bool
    identifier: str | None = None  # None until the claim step decides it
    dtype: str | None = None
    metadata_json: str | None = None
    target_name: str | None = None  # the stored file's name

    @classmethod
    def of(cls, item: Item) -> Intent:
        """The intent journaled in ``item``'s row."""
        return cls(
            inbox=item.inbox,
            relpath=item.relpath,
            archive_name=item.archive,
            archive_path=_archive_path(item.archive_path),
            placement=item.placement,
            verify=item.verify,
            identifier=item.name,
            dtype=item.dtype,
            metadata_json=item.metadata_json,
            target_name=item.target_name,
        )

    @property
    def target(self) -> Path | None:
        """Where the input is stored, filed by its identifier (None before claim)."""
        if self.identifier is None or self.target_name is None:
            return None
        return stored_file(self.archive_path, self.identifier, self.target_name)

    def fix(self, spec: InboxSpec) -> InboxSpec:
        """``spec`` with the archive, placement and verify setting this intent fixed."""
        fixed = (self.archive_name, self.archive_path, self.placement, self.verify)
        if (spec.archive_name, spec.archive_path, spec.placement, spec.verify) == fixed:
            return spec  # as configured (the common case): no copy
        return replace(
            spec,
            archive_name=self.archive_name,
            archive_path=self.archive_path,
            placement=self.placement,
            verify=self.verify,
        )


@dataclass(frozen=True)
class InboxSpec:
    config: InboxConfig = field(repr=False)
    archive_name: str
    archive_path: Path
    placement: str  # "copy" or "rename": the configuration's, or the intent's
    verify: bool
    config_source: Path | None = None  # the daemon's configuration file (requeue hints)
    work_id: tuple[int, int] | None = None  # (device, inode) recorded at start
    rejected_id: tuple[int, int] | None = None
    work_proof: str | None = None  # the token left in the work folder at start
    rejected_owner: int | None = None  # the rejected folder's uid at start

    @classmethod
    def of(
        cls,
        inbox: InboxConfig,
        archive: ArchiveConfig,
        *,
        config_source: Path | None = None,
        work_id: tuple[int, int] | None = None,
        rejected_id: tuple[int, int] | None = None,
        work_proof: str | None = None,
        rejected_owner: int | None = None,
    ) -> InboxSpec:
        """The spec of a configured inbox and the archive it deposits into."""
        return cls(
            config=inbox,
            archive_name=archive.name,
            archive_path=archive.path,
            placement=inbox.placement,
            verify=inbox.verify,
            config_source=config_source,
            work_id=work_id,
            rejected_id=rejected_id,
            work_proof=work_proof,
            rejected_owner=rejected_owner,
        )

    @property
    def key(self) -> str:
        """The inbox's path as text: its identity in the journal and status."""
        return str(self.config.path)

    @property
    def path(self) -> Path:
        return self.config.path

    @property
    def rejected_dir(self) -> Path:
        return self.config.rejected_path

    @property
    def work_dir(self) -> Path:
        return self.config.work_dir

    def open_fs(self, *, rejected: str | None = None) -> InboxFS:
        """The inbox folder, opened once, with its checked work and rejected folders.

        ``rejected``: another rejected folder (relative to the inbox) to reach instead,
        an earlier one of the inbox (``nbankctl requeue`` takes inputs out of it): no
        identity was recorded for it, so it is only checked to be a real folder on
        the inbox's filesystem, reached without a link."""
        current = os.path.relpath(self.rejected_dir, self.path)
        if rejected is not None and rejected != current:
            return InboxFS(
                self.path,
                work=WORK_DIR_NAME,
                rejected=rejected,
                work_id=self.work_id,
                work_proof=self.work_proof,
            )
        return InboxFS(
            self.path,
            work=WORK_DIR_NAME,
            rejected=current,
            work_id=self.work_id,
            rejected_id=self.rejected_id,
            work_proof=self.work_proof,
            rejected_owner=self.rejected_owner,
        )

    def rules(
        self,
        *,
        auto_identifiers: bool,
        auto_id_type: str | None,
        keep_extensions: bool,
        allow_directories: bool,
    ) -> InboxRules:
        """Combines this inbox's settings with its archive's policy (read at claim time)."""
        inbox = self.config
        return InboxRules(
            dtype=inbox.dtype,
            dtype_by_extension=inbox.dtype_by_extension,
            metadata=inbox.metadata,
            path_metadata=inbox.path_metadata,
            auto_id=auto_identifiers if inbox.auto_id is None else inbox.auto_id,
            auto_id_type=auto_id_type,
            keep_extensions=keep_extensions,
            allow_directories=allow_directories,
        )

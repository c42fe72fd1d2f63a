"""The run-time view of one inbox that the deposit steps need.

An :class:`InboxSpec` is the inbox's parsed configuration (held, never copied
field by field) plus what only the running daemon knows: the archive it was
resolved to, the configuration file's path for hints, and the identities of its
work and rejected folders recorded at start. Frozen, so a reload swaps whole
records instead of mutating shared state under running workers. For an item in
flight, :meth:`nbankd.deposit.stepbase.StepsBase._spec` replaces the archive,
placement and verify setting with the ones journaled at claim.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from nbankd.config.model import ArchiveConfig, InboxConfig
from nbankd.deposit.inboxfs import InboxFS
from nbankd.deposit.policy import InboxRules
from nbankd.names import WORK_DIR_NAME


@dataclass(frozen=True)
class InboxSpec:
    config: InboxConfig = field(repr=False)
    archive_name: str
    archive_path: Path
    placement: str  # "copy" or "rename": the configuration's, or the journaled one
    verify: bool
    config_source: Path | None = None  # the daemon's configuration file (requeue hints)
    work_id: tuple[int, int] | None = None  # (device, inode) recorded at start
    rejected_id: tuple[int, int] | None = None

    @classmethod
    def of(
        cls,
        inbox: InboxConfig,
        archive: ArchiveConfig,
        *,
        config_source: Path | None = None,
        work_id: tuple[int, int] | None = None,
        rejected_id: tuple[int, int] | None = None,
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

    def open_fs(self) -> InboxFS:
        """The inbox folder, opened once, with its checked work and rejected folders."""
        return InboxFS(
            self.path,
            work=WORK_DIR_NAME,
            rejected=os.path.relpath(self.rejected_dir, self.path),
            work_id=self.work_id,
            rejected_id=self.rejected_id,
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

"""The run-time view of one inbox that the deposit steps need.

Built by the daemon from the parsed configuration; frozen so a reload swaps
whole records instead of mutating shared state under running workers.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbankd.deposit.inboxfs import InboxFS
from nbankd.deposit.policy import InboxRules
from nbankd.names import WORK_DIR_NAME


@dataclass(frozen=True)
class InboxSpec:
    key: str  # the inbox's path as text: its identity in the journal and status
    path: Path
    rejected_dir: Path
    archive_name: str
    archive_path: Path
    dtype: str | None = None
    dtype_by_extension: Mapping[str, str] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    path_metadata: re.Pattern[str] | None = None
    auto_id: bool | None = None  # None: follow the archive policy
    placement: str = "copy"  # or "rename"
    verify: bool = True
    directories: str = "files"  # or "resources"
    config_source: Path | None = None  # the daemon's configuration file (requeue hints)
    work_id: tuple[int, int] | None = None  # (device, inode) recorded at start
    rejected_id: tuple[int, int] | None = None

    def open_fs(self) -> InboxFS:
        """The inbox folder, opened once, with its checked work and rejected folders."""
        return InboxFS(
            self.path,
            work=WORK_DIR_NAME,
            rejected=os.path.relpath(self.rejected_dir, self.path),
            work_id=self.work_id,
            rejected_id=self.rejected_id,
        )

    @property
    def work_dir(self) -> Path:
        return self.path / WORK_DIR_NAME

    def rules(
        self,
        *,
        auto_identifiers: bool,
        auto_id_type: str | None,
        keep_extensions: bool,
        allow_directories: bool,
    ) -> InboxRules:
        """Combines this inbox's settings with its archive's policy (read at claim time)."""
        return InboxRules(
            dtype=self.dtype,
            dtype_by_extension=self.dtype_by_extension,
            metadata=self.metadata,
            path_metadata=self.path_metadata,
            auto_id=auto_identifiers if self.auto_id is None else self.auto_id,
            auto_id_type=auto_id_type,
            keep_extensions=keep_extensions,
            allow_directories=allow_directories,
        )

"""The effective configuration as YAML text, for ``nbankd check-config``.

Every default is filled in, paths are absolute, durations use the shortest
exact unit, and the ``datatypes`` section lists every datatype the
configuration names with the content type it would be created with. The text
loads back to the same configuration. It never holds credentials: the
loader refuses URLs with a user or password, and ``registry_auth`` is a path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from nbankd.config.durations import format_duration
from nbankd.config.model import Config, InboxConfig

__all__ = ["describe_config", "effective_settings"]


def _plain(value: Any) -> Any:
    """Read-only mappings and tuples to the dicts and lists YAML can dump."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _inbox(inbox: InboxConfig) -> dict[str, Any]:
    return {
        "path": str(inbox.path),
        "archive": inbox.archive,
        "dtype": inbox.dtype,
        "dtype_by_extension": _plain(inbox.dtype_by_extension),
        "metadata": _plain(inbox.metadata),
        "path_metadata": inbox.path_metadata.pattern if inbox.path_metadata else None,
        "auto_id": inbox.auto_id,
        "recursive": inbox.recursive,
        "settle_seconds": _number(inbox.settle_seconds),
        "ready": inbox.ready,
        "watch": inbox.watch,
        "ignore": list(inbox.ignore),
        "stall_after": format_duration(inbox.stall_after),
        "rescan_every": format_duration(inbox.rescan_every),
        "watch_check_every": format_duration(inbox.watch_check_every),
        "fallback_poll_every": format_duration(inbox.fallback_poll_every),
        "placement": inbox.placement,
        "verify": inbox.verify,
        "directories": inbox.directories,
        "file_metadata": inbox.file_metadata,
        "rejected_dir": inbox.rejected_dir,
    }


def effective_settings(config: Config) -> dict[str, Any]:
    """The configuration as plain data, in the file's vocabulary (see module doc)."""
    return {
        "registry": config.registry,
        "registry_url": config.registry_url,
        "registry_aliases": list(config.registry_aliases),
        "registry_auth": str(config.registry_auth) if config.registry_auth else None,
        "state_dir": str(config.state_dir),
        "control_socket": str(config.control_socket),
        "control": {
            "readers": list(config.control.readers),
            "admins": list(config.control.admins),
        },
        "datatypes": {
            name: config.content_type_for(name) for name in sorted(config.datatypes_needed())
        },
        "archives": [
            {"path": str(a.path), "name": a.name, "create": a.create} for a in config.archives
        ],
        "inboxes": [_inbox(inbox) for inbox in config.inboxes],
        "audit": {
            "every": format_duration(config.audit.every),
            "scrub_days": config.audit.scrub_days,
            "max_mb_per_s": _number(config.audit.max_mb_per_s),
            "workers": config.audit.workers or "auto",
        },
        "log": {"format": config.log.format, "level": config.log.level},
    }


def describe_config(config: Config) -> str:
    """YAML text of the effective configuration, with a header naming its source."""
    header = [f"# effective configuration of {config.source}"]
    if config.embedded:
        header.append(f"# embedded registry database: {config.embedded_db_path}")
    body = yaml.safe_dump(
        effective_settings(config), sort_keys=False, default_flow_style=False, allow_unicode=True
    )
    return "\n".join(header) + "\n" + body

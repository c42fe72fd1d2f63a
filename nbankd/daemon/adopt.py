"""An empty embedded registry over archives that already hold resources.

That is what a lost ``state_dir`` looks like at the next start: the daemon would
build a new, empty registry, and every stored resource would have no record (an
audit then calls them all missing). So the daemon refuses to start
(:func:`check_not_orphaned`), naming the two ways out:

- restore ``state_dir`` from its backup (the deployment guide says how), or
- start once with ``nbankd --adopt-archives``: every resource stored in a
  configured archive is registered under its identifier with its SHA-1 (a
  folder's neurobank directory hash), the datatype of the inbox that deposits
  into that archive, a location in it, and the metadata ``{"adopted": <time>}``
  marking it adopted (:func:`adopt`). Adoption only fills an empty registry.
"""

from __future__ import annotations

import time

import structlog

from nbankd import errors
from nbankd.archive import layout, opening
from nbankd.config import Config
from nbankd.hashing import hash_path
from nbankd.registry.base import Registry
from nbankd.timefmt import iso

log = structlog.get_logger("nbankd.adopt")


def _holding(config: Config) -> list[tuple[str, layout.Archive]]:
    """(name, archive) of each configured archive that stores at least one resource."""
    out = []
    for arch in config.archives:
        try:
            archive = opening.open_archive(arch.path)
        except errors.NbankdError:
            continue  # unmounted or not made yet: nothing to say about it now
        if next(iter(archive.iter_resources()), None) is not None:
            out.append((arch.name, archive))
    return out


def _empty(registry: Registry) -> bool:
    return next(iter(registry.search()), None) is None


def check_not_orphaned(config: Config, registry: Registry) -> None:
    """Refuses (ConfigError, exit 2) an empty embedded registry over archives that
    hold resources; see the module docstring."""
    if not config.embedded or not _empty(registry):
        return
    holding = _holding(config)
    if holding:
        names = ", ".join(f"{n} ({a.path})" for n, a in holding)
        raise errors.ConfigError(
            f"the embedded registry {config.embedded_db_path} is empty, but archive(s) "
            f"{names} already hold resources: was state_dir lost or replaced? nbankd does "
            "not start a new registry over them",
            hint="restore state_dir from its backup (docs/deployment.md, backups); or, "
            "to record the stored files anew, start once with nbankd --adopt-archives",
        )


def adopt(config: Config, registry: Registry, *, now: float | None = None) -> int:
    """Registers every resource stored in the configured archives into the empty
    embedded registry; returns how many. ConfigError when it is not empty, or when
    an archive has no inbox to take a datatype from."""
    if not config.embedded:
        raise errors.ConfigError("--adopt-archives applies to the embedded registry only")
    if not _empty(registry):
        raise errors.ConfigError(
            f"the embedded registry {config.embedded_db_path} is not empty: "
            "--adopt-archives only rebuilds an empty one",
            hint="start without --adopt-archives",
        )
    when = iso(time.time() if now is None else now)
    count = 0
    for name, archive in _holding(config):
        dtypes = [i.dtype for i in config.inboxes if i.archive == name and i.dtype]
        if not dtypes:
            raise errors.ConfigError(
                f"archive {name} has no inbox with a dtype to record its resources under",
                hint="give an inbox that deposits into it a dtype, then adopt again",
            )
        for ident, path in archive.iter_resources():
            registry.add_resource(
                name=ident,
                dtype=dtypes[0],
                archive=name,
                sha1=hash_path(path),
                metadata={"adopted": when},
            )
            count += 1
        log.info("adopted archive", archive=name, resources=count)
    return count

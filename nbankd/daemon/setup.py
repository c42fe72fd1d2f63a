"""Start-up preparation: state folder, archives, datatypes, inboxes, inbox specs.

Everything here is idempotent and safe to run at every start and reload.
Problems that an operator can fix while the daemon runs (an unmounted archive,
an unreachable registry) are returned, not raised: the daemon retries them.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from nbankd import errors
from nbankd.archive import opening
from nbankd.archive.layout import STAGING_NAME
from nbankd.archive.probe import Capabilities, host_ahead, place_across, probe, why_not_placed
from nbankd.config import Config
from nbankd.config.inboxlinks import inbox_link_problem
from nbankd.config.model import ARCHIVE_SCHEME, ArchiveConfig, resolved_path
from nbankd.deposit.inboxfs import Escape, FolderId, Tampered, prepare_folders, prove_folders
from nbankd.deposit.spec import InboxSpec
from nbankd.names import PROBE_PREFIX, WORK_DIR_NAME
from nbankd.registry.base import Registry
from nbankd.registry.urls import same_registry

log = structlog.get_logger("nbankd.setup")


@dataclass(frozen=True)
class ArchiveProblem:
    archive: str
    message: str
    transient: bool = False  # may pass by itself (outage, unmounted filesystem): retry
    #: the registry has no record of the archive's name with its folder as root: nothing
    #: is deposited into it (see :func:`registration_problem`)
    unregistered: bool = False


def prepare_state_dir(state_dir: Path) -> None:
    """Creates ``state_dir`` (mode 0750) with its receipts folder, after checking that
    no other user can write it (:func:`check_state_dir_owner`)."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    check_state_dir_owner(state_dir)
    (state_dir / "receipts").mkdir(exist_ok=True, mode=0o750)


#: what the state directory holds that decides what the daemon claims and moves
STATE_FILES = ("journal.sqlite3", "registry.sqlite3", "nbankd.lock")


def check_state_dir_owner(state_dir: Path, euid: int | None = None) -> None:
    """Raises ConfigError naming ``state_dir`` (or one of :data:`STATE_FILES` in it)
    when it is owned by a user other than the daemon's (or root), or writable by
    other users: whoever can write there can plant a journal entry that makes the
    daemon claim, deposit and remove a file they could not touch themselves."""
    me = os.geteuid() if euid is None else euid
    for path in (state_dir, *(state_dir / name for name in STATE_FILES)):
        try:
            st = os.lstat(path) if path != state_dir else os.stat(path)
        except FileNotFoundError:
            continue
        why = None
        if path != state_dir and stat.S_ISLNK(st.st_mode):
            raise errors.ConfigError(
                f"state_dir: {path} is a symbolic link: nbankd keeps its state files in "
                "state_dir itself (a link, or the folder it leads to, may be changed by "
                "others); nbankd did not start",
                hint=f"move the file it points to ({os.path.realpath(path)}) back to {path}, "
                "or point state_dir at the folder where the state should live",
            )
        if st.st_uid not in (me, 0):
            why = f"is owned by {_user(st.st_uid)}, not by nbankd's user ({_user(me)})"
        elif st.st_mode & stat.S_IWOTH:
            why = "is writable by every user"
        if why is not None:
            raise errors.ConfigError(
                f"state_dir: {path} {why}: whoever can write the state directory can make "
                "nbankd claim, deposit and remove files they could not touch themselves; "
                "nbankd did not start",
                hint=f"chown {_user(me)} {path} && chmod o-w {path} (state_dir belongs to "
                "nbankd's user alone), then start nbankd again",
            )


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


#: an inbox's work and rejected folders' identities, the work folder's token and the
#: rejected folder's owner (the last two None when the token could not be written)
InboxFolders = tuple[FolderId, FolderId, str | None, int | None]


def inbox_specs(
    config: Config, folders: dict[str, InboxFolders] | None = None
) -> dict[str, InboxSpec]:
    """The run-time view of each inbox; ``folders`` holds what
    :func:`prepare_inbox_folders` recorded of its work and rejected folders."""
    specs: dict[str, InboxSpec] = {}
    for inbox in config.inboxes:
        found = (folders or {}).get(str(inbox.path))
        work_id, rejected_id, proof, owner = found or (None, None, None, None)
        specs[str(inbox.path)] = InboxSpec.of(
            inbox,
            config.archive_for(inbox),
            config_source=config.source,
            work_id=work_id,
            rejected_id=rejected_id,
            work_proof=proof,
            rejected_owner=owner,
        )
    return specs


def prepare_inbox_folders(
    config: Config, kept: dict[str, InboxFolders] | None = None
) -> dict[str, InboxFolders]:
    """Creates missing inbox, work and rejected folders (work folder private to the
    daemon) without following links, and leaves a token in each work folder (see
    :mod:`nbankd.deposit.folderproof`); returns inbox key -> what it recorded.
    ``kept``: inboxes whose recorded folders stand as they are (not looked at)."""
    ids: dict[str, InboxFolders] = dict(kept or {})
    for inbox in config.inboxes:
        if str(inbox.path) in ids:
            continue
        inbox_link_problem(inbox.path)
        try:
            inbox.path.mkdir(parents=True, exist_ok=True, mode=0o777)
        except FileExistsError:  # there, but not a folder (a file, a broken link)
            raise errors.ConfigError(
                f"{inbox.path} exists but is not a folder",
                hint="move it away (nbankd never deletes it), then start nbankd again",
            ) from None
        work_id, rejected_id = prepare_folders(
            inbox.path, work=WORK_DIR_NAME, rejected=inbox.rejected_dir, owner=os.geteuid()
        )
        proof: str | None = None
        owner: int | None = None
        try:
            proof, owner = prove_folders(
                inbox.path,
                work=WORK_DIR_NAME,
                work_id=work_id,
                rejected=inbox.rejected_dir,
                rejected_id=rejected_id,
            )
        except (Escape, Tampered, OSError) as err:  # a full filesystem: deposits go on
            log.warning(
                "cannot leave the work folder's token; after a remount renumbering the "
                "inbox's folders (SSHFS), deposits from it wait for a reload",
                inbox=str(inbox.path),
                error=str(err),
            )
        ids[str(inbox.path)] = (work_id, rejected_id, proof, owner)
    return ids


def inbox_folders_problem(spec: InboxSpec) -> tuple[str | None, tuple[int, int] | None]:
    """(why the inbox's work or rejected folder cannot be used now (replaced by a link
    or another folder, removed), or None when both are the folders recorded at start;
    the (device, inode) of the inbox folder they were reached from, when they were):
    an inbox folder swapped for a link to another place has no such work folder, so
    the folder this names is the one to list and watch."""
    try:
        with spec.open_fs() as fs:
            fs.work  # noqa: B018 - opening it is the check
            fs.rejected  # noqa: B018
            st = os.fstat(fs.root)
    except (Tampered, Escape) as err:
        return str(err), None
    except OSError as err:
        if errors.out_of_descriptors(err):  # nbankd's limit: the scan fails, not the inbox
            raise
        return f"cannot open inbox {spec.path}: {err.strerror or err}", None
    return None, (st.st_dev, st.st_ino)


@dataclass(frozen=True)
class PlacementCheck:
    """What proving an inbox's placement found (:func:`check_placement`)."""

    problem: str | None = None  # None: proved (or nothing to prove: placement: copy)
    refused: bool = False  # it can never work as configured (else: not proved yet)
    hint: str = ""

    @property
    def shown(self) -> str | None:
        """The problem with what to do about it, for logs and status (None: proved)."""
        if self.problem is None:
            return None
        return f"{self.problem} ({self.hint})" if self.hint else self.problem


def prove_placements(cfg: Config, specs: Mapping[str, InboxSpec]) -> dict[str, str | None]:
    """:func:`check_placement` of each inbox of ``specs`` (key -> spec): key -> why its
    deposits wait (None: proved, or nothing to prove). Raises ConfigError naming the
    file, each inbox whose ``placement: rename`` can never work and what to do, so that
    nothing is ever claimed or registered for it: at start nbankd does not start, at a
    reload the running configuration is kept."""
    found = {key: check_placement(spec) for key, spec in specs.items()}
    where = {str(inbox.path): f"inboxes[{i}]" for i, inbox in enumerate(cfg.inboxes)}
    refused = [
        f"{cfg.source}: {where.get(key, key)}: {check.problem}"
        for key, check in found.items()
        if check.refused
    ]
    if refused:
        hint = next(c.hint for c in found.values() if c.refused)
        raise errors.ConfigError("; ".join(refused), hint=hint)
    return {key: check.shown for key, check in found.items()}


def check_placement(spec: InboxSpec) -> PlacementCheck:
    """Proves that ``placement: rename`` can publish this inbox's inputs: a file made
    in its work folder is linked into its archive's ``staging/`` folder as a publish in
    place would link it (:func:`~nbankd.archive.probe.place_across`), and both names
    are removed. One device number does not prove it: an inbox reached through a bind
    mount of a folder on the archive's filesystem shares the archive's and still fails
    with EXDEV, so its inputs would be registered and never published. ``refused``
    when it can never work as configured; a problem not ``refused`` when it could not
    be tried now (the archive not there yet, the work folder unusable): its deposits
    wait, and it is tried again. Nothing to prove for ``placement: copy``."""
    if spec.placement != "rename":
        return PlacementCheck()
    name = f"{PROBE_PREFIX}placement-{secrets.token_hex(8)}"
    staging: Path | None = None
    try:
        staging = opening.ensure_staging(opening.open_archive(spec.archive_path))
        with spec.open_fs() as fs:
            into = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                failed = place_across(fs.work, into, name)
            finally:
                os.close(into)
    except (errors.NbankdError, OSError) as err:
        where = f"archive {spec.archive_name!r}" if staging is None else str(staging)
        why = str(err)
        if isinstance(err, OSError) and err.strerror:
            why = f"{err.strerror} ({os.fsdecode(err.filename)})" if err.filename else err.strerror
        return PlacementCheck(
            f"placement: rename not proved yet: a file of its work folder could not be "
            f"linked into {where}: {why}; its deposits wait until it is"
        )
    if failed is None:
        return PlacementCheck()
    return PlacementCheck(
        f"placement: rename cannot work for inbox {spec.path}: it is "
        f"{why_not_placed(failed)}; a file in its work folder cannot be linked into "
        f"archive {spec.archive_name!r} ({staging}), so its inputs would be registered "
        "and never published",
        refused=True,
        hint="use placement: copy for this inbox, or give it a path on the archive's own "
        "mount, not through a bind mount",
    )


def ensure_datatypes(config: Config, registry: Registry) -> list[str]:
    """With the embedded registry, creates every datatype the configuration names.

    Against django-neurobank, datatypes must exist already; missing ones are returned.
    """
    known = {d.name for d in registry.list_datatypes()}
    missing = sorted(config.datatypes_needed() - known)
    if not config.embedded:
        return missing
    for name in missing:
        with contextlib.suppress(errors.DatatypeTaken):  # another process made it meanwhile
            registry.add_datatype(name, config.content_type_for(name))
        log.info("created datatype", dtype=name)
    return []


def ensure_archives(config: Config, registry: Registry) -> list[ArchiveProblem]:
    """Creates (``create: true``) and registers archives; returns what is not usable now.

    An archive whose name the registry records at another root, or not at all (its
    folder registered under another name), is not usable: whatever was deposited there
    would be located where its file is not (:func:`registration_problem`). No archive is
    made at a path whose name the registry places elsewhere. Such a problem is retried
    (the registry may be put right while the daemon runs); the configuration's side
    changes at a reload."""
    problems: list[ArchiveProblem] = []
    for arch in config.archives:
        try:
            record = registry.get_archive(arch.name)
            elsewhere = record is not None and not arch.has_root(record.scheme, record.root)
            if not arch.nbank_json.exists():
                if elsewhere:
                    problem = registration_problem(registry, arch.name, arch.path)
                    if problem is not None:
                        problems.append(_unregistered(arch.name, problem))
                        continue
                if not arch.create:
                    problems.append(
                        ArchiveProblem(
                            arch.name,
                            f"{arch.nbank_json} does not exist: is the archive's filesystem "
                            "mounted? (set create: true to make a new archive there)",
                            transient=True,
                        )
                    )
                    continue
                opening.create_archive(arch.path, registry.url)
                log.info("created archive", archive=arch.name, path=str(arch.path))
            opening.open_archive(arch.path)
            if (
                record is None
                and (config.embedded or arch.create)
                and registry.find_archive_by_root(arch.root) is None
            ):
                registry.add_archive(arch.name, ARCHIVE_SCHEME, arch.root)
                log.info("registered archive", archive=arch.name, root=arch.root)
            problem = registration_problem(registry, arch.name, arch.path)
            if problem is not None:
                problems.append(_unregistered(arch.name, problem))
        except errors.NbankdError as err:
            problems.append(ArchiveProblem(arch.name, str(err), transient=err.transient))
        except OSError as err:
            message = f"{arch.path}: {err.strerror or err}"
            problems.append(ArchiveProblem(arch.name, message, transient=True))
    return problems


def _unregistered(name: str, message: str) -> ArchiveProblem:
    return ArchiveProblem(name, message, transient=True, unregistered=True)


def registration_problem(registry: Registry, name: str, path: Path) -> str | None:
    """None when ``registry`` records archive ``name`` with ``path`` as its root (scheme
    ``neurobank``; the path as given or with links resolved); else why nothing may be
    deposited into it: nbank locate and fetch find a resource under the root its
    location's archive has in the registry, so a file stored at ``path`` under a record
    naming ``name`` would be looked for where it is not. Says what the registry has
    and what to do."""
    record = registry.get_archive(name)
    arch = ArchiveConfig(path=path, name=name)
    if record is not None and arch.has_root(record.scheme, record.root):
        return None
    by_root = registry.find_archive_by_root(arch.root)
    if by_root is None and resolved_path(path) != arch.root:
        by_root = registry.find_archive_by_root(resolved_path(path))
    if record is None:
        has = f"the registry ({registry.url}) has no archive {name!r}"
    else:
        has = f"the registry ({registry.url}) has archive {name!r} at {record.scheme}:{record.root}"
    if by_root is not None and by_root.name != name:
        fix = (
            f"set name: {by_root.name} for this archive in the configuration (the "
            f"registry's name for {path}) and reload"
        )
    elif record is not None:
        fix = (
            f"set path: {record.root} back for archive {name!r} in the configuration and "
            f"reload, or, if the archive really moved to {path}, change the root of "
            f"{name!r} in the registry"
        )
    else:
        fix = f"register it with 'nbankctl init {path}', or set create: true and reload"
    return (
        f"archive {name!r} is configured at {path}, but {has}: nothing is deposited "
        "into it (its records would send nbank locate and fetch where its files are "
        f"not) and its inputs wait in their inbox; {fix}"
    )


def archive_usable(
    path: Path, registry_url: str | None = None, aliases: tuple[str, ...] = ()
) -> str | None:
    """None if the archive can take deposits now, else why not (for status).

    With ``registry_url`` (this daemon's registry), an archive whose ``nbank.json``
    names another registry is not usable: its deposits would be recorded where the
    archive does not say.
    """
    try:
        archive = opening.open_archive(path)
    except errors.NbankdError as err:
        return str(err)
    if registry_url is not None and not same_registry(archive.registry_url, registry_url, aliases):
        return (
            f"{path}/nbank.json names the registry {archive.registry_url}, not this "
            f"daemon's {registry_url}: nothing is deposited there (its records would go "
            "to a registry the archive does not name); fix the registry in the "
            "configuration or in nbank.json, or list the other address under "
            "registry_aliases if both name one registry"
        )
    if not os.access(archive.resources_dir, os.W_OK | os.X_OK):
        return f"{archive.resources_dir} is not writable by this user"
    return None


def host_ahead_of(archive_path: Path) -> float:
    """Seconds this host's clock runs ahead of the one stamping the archive's files (0
    when it cannot be told): logged, as audits then age what others write by the
    archive's clock."""
    ahead = host_ahead(archive_path / STAGING_NAME)
    if ahead:
        log.warning(
            "this host's clock runs ahead of the archive's file server; audits age "
            "files by the server's clock",
            archive=str(archive_path),
            seconds=round(ahead, 1),
        )
    return ahead


def probe_archives(cfg: Config) -> dict[str, Capabilities]:
    """What each configured archive's filesystem can do (hard links, RENAME_NOREPLACE,
    O_DIRECT, flock), logging what the daemon does instead of what is missing. An
    archive that cannot be probed now (unmounted) is left out: the next reload probes
    it again."""
    found: dict[str, Capabilities] = {}
    for archive in cfg.archives:
        try:
            caps = probe(opening.ensure_staging(opening.open_archive(archive.path)))
        except (errors.NbankdError, OSError) as err:
            log.info("archive not probed", archive=archive.name, error=str(err))
            continue
        found[archive.name] = caps
        log.info("archive capabilities", archive=archive.name, **caps.to_json())
        for note in caps.notes():
            log.warning("archive filesystem", archive=archive.name, note=note)
    return found

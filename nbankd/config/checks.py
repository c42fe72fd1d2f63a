"""Run-time checks of a parsed configuration against the world.

Parsing (:mod:`.loader`) never touches anything but the configuration file;
these functions do, and each returns a list of :class:`~.model.Problem` rather
than raising, so ``nbankd check-config`` and start-up can report everything.

- :func:`prepare_inboxes` creates missing inbox and rejected folders;
- :func:`check_paths` looks at archives, inboxes and the credentials file;
- :func:`check_against_registry` asks the registry about datatypes, archives
  and credentials.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from pathlib import Path

from nbankd import errors
from nbankd.archive.layout import STAGING_NAME
from nbankd.archive.probe import place_across, why_not_placed
from nbankd.config.inboxlinks import inbox_link_problem
from nbankd.config.model import (
    ARCHIVE_SCHEME,
    ArchiveConfig,
    Config,
    InboxConfig,
    Problem,
    Severity,
    resolved_path,
)
from nbankd.filekind import FileKind
from nbankd.names import PROBE_PREFIX, WORK_DIR_NAME
from nbankd.registry.base import Registry

__all__ = ["check_against_registry", "check_paths", "prepare_inboxes"]


class _Report:
    def __init__(self, config: Config) -> None:
        self.source = config.source
        self.problems: list[Problem] = []

    def add(
        self,
        key: str,
        message: str,
        hint: str = "",
        severity: Severity = "error",
        code: str = "config",
    ) -> None:
        self.problems.append(Problem(self.source, key, message, None, severity, hint, code))

    def warn(self, key: str, message: str, hint: str = "") -> None:
        self.add(key, message, hint, "warning")


def prepare_inboxes(config: Config) -> list[Problem]:
    """Creates every missing inbox folder and its rejected folder (with parents).

    Existing folders are left as they are. A failure for one inbox (permission
    denied, read-only filesystem) is reported and the others are still prepared.
    """
    report = _Report(config)
    for index, inbox in enumerate(config.inboxes):
        for key, folder in (("path", inbox.path), ("rejected_dir", inbox.rejected_path)):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except FileExistsError:
                report.add(f"inboxes[{index}].{key}", f"{folder} exists and is not a folder")
                break
            except OSError as err:
                report.add(
                    f"inboxes[{index}].{key}",
                    f"cannot create {folder}: {err.strerror or err}",
                    hint="create it yourself, writable by the daemon's user",
                )
                break
    return report.problems


def _read_policy(archive: ArchiveConfig) -> tuple[dict[str, object] | None, str]:
    """(nbank.json contents, "") or (None, why it could not be read)."""
    try:
        data = json.loads(archive.nbank_json.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, "missing"
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return None, f"unreadable: {err}"
    if not isinstance(data, dict):
        return None, "unreadable: not a JSON object"
    return data, ""


def _device(path: Path) -> int | None:
    """st_dev of path or of its nearest existing parent (inboxes may not exist yet)."""
    for candidate in (path, *path.parents):
        try:
            return candidate.stat().st_dev
        except OSError:
            continue
    return None


def check_paths(config: Config) -> list[Problem]:
    """Looks at the files the configuration names; reports without changing anything.

    - an archive without ``nbank.json`` is a warning (not yet created, or an
      unmounted filesystem: the daemon reports and retries), unless ``create: true``;
    - an unreadable ``nbank.json`` is an error;
    - ``directories: resources`` needs the archive's ``allow_directories`` policy;
    - ``placement: rename`` needs the inbox and the archive on one filesystem, and
      one mount of it: a file of the inbox's work folder is linked into the archive's
      ``staging/`` to prove it (:func:`_prove_rename`);
    - with a django-neurobank registry, an archive's ``nbank.json`` should name it;
    - ``registry_auth`` must be an existing regular file, not readable by others.
    """
    report = _Report(config)
    policies: dict[str, dict[str, object]] = {}
    for index, archive in enumerate(config.archives):
        data, why = _read_policy(archive)
        key = f"archives[{index}].path"
        if data is None:
            if why == "missing" and not archive.create:
                report.warn(
                    key,
                    f"{archive.nbank_json} does not exist: not a neurobank archive yet, or "
                    "its filesystem is not mounted; deposits wait until it appears",
                    hint="run `nbankctl init PATH`, or set create: true",
                )
            elif why != "missing":
                report.add(key, f"{archive.nbank_json} is {why}")
            continue
        policies[archive.name] = data
        registry_url = data.get("registry")
        if (
            not config.embedded
            and isinstance(registry_url, str)
            and registry_url.rstrip("/") != config.registry.rstrip("/")
        ):
            report.warn(
                key,
                f"the archive's nbank.json names registry {registry_url}, "
                f"but this configuration uses {config.registry}",
            )
    for index, inbox in enumerate(config.inboxes):
        _check_inbox_links(report, index, inbox.path)
        archive = config.archive_for(inbox)
        policy = policies.get(archive.name, {}).get("policy")
        if (
            inbox.directories == "resources"
            and isinstance(policy, dict)
            and not policy.get("allow_directories", False)
        ):
            report.add(
                f"inboxes[{index}].directories",
                f"is 'resources' but archive {archive.name!r} does not allow directories",
                hint=f"set allow_directories: true in the policy of {archive.nbank_json}",
            )
        if inbox.placement == "rename":
            inbox_dev, archive_dev = _device(inbox.path), _device(archive.path)
            if inbox_dev is not None and archive_dev is not None and inbox_dev != archive_dev:
                report.add(
                    f"inboxes[{index}].placement",
                    f"is 'rename' but {inbox.path} and archive {archive.name!r} "
                    f"({archive.path}) are on different filesystems",
                    hint="use placement: copy",
                )
            elif archive.name in policies:
                _prove_rename(report, index, inbox, archive)
    if config.registry_auth is not None:
        try:
            mode = config.registry_auth.stat().st_mode
        except OSError as err:
            report.add("registry_auth", f"cannot read {config.registry_auth}: {err.strerror}")
        else:
            if not stat.S_ISREG(mode):
                kind = FileKind.of_mode(mode)
                noun = "a folder" if kind is FileKind.DIRECTORY else f"a {kind.noun}"
                report.add(
                    "registry_auth",
                    f"{config.registry_auth} is {noun}, not a regular file",
                    hint="name a file holding user:password or netrc entries",
                )
            elif mode & (stat.S_IRWXG | stat.S_IRWXO):
                report.warn(
                    "registry_auth",
                    f"{config.registry_auth} holds credentials and is readable by others",
                    hint=f"chmod 600 {config.registry_auth}",
                )
    return report.problems


def _prove_rename(report: _Report, index: int, inbox: InboxConfig, archive: ArchiveConfig) -> None:
    """Proves ``placement: rename`` as nbankd does at start: a file made in the inbox's
    work folder is linked into the archive's ``staging/`` folder, then both names are
    removed (:func:`nbankd.archive.probe.place_across`). An error when it can never
    work (an inbox on another mount of the archive's filesystem: a bind mount shares
    its device number); a warning when it could not be tried (the work folder not made
    yet, a user who may not write it): nbankd proves it at start and does not start
    when it cannot work."""
    key = f"inboxes[{index}].placement"
    work, staging = inbox.path / WORK_DIR_NAME, archive.path / STAGING_NAME
    opened: list[int] = []
    try:
        top = os.open(inbox.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        opened.append(top)
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        opened.append(os.open(WORK_DIR_NAME, flags, dir_fd=top))
        opened.append(os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        failed = place_across(
            opened[1], opened[2], f"{PROBE_PREFIX}placement-{secrets.token_hex(8)}"
        )
    except OSError as err:
        report.warn(
            key,
            f"is 'rename' but could not be proved to work here: a file of {work} could not "
            f"be linked into {staging}: {err.strerror or err}; nbankd proves it at start "
            "and does not start if it cannot work",
            hint=f"check again as nbankd's user once nbankd has started once (it makes {work})",
        )
        return
    finally:
        for fd in opened:
            os.close(fd)
    if failed is not None:
        report.add(
            key,
            f"is 'rename' but {inbox.path} is {why_not_placed(failed)}: a file of {work} "
            f"cannot be linked into archive {archive.name!r} ({staging}), so its inputs "
            "would be registered and never published; nbankd does not start",
            hint="use placement: copy, or give the inbox a path on the archive's own mount, "
            "not through a bind mount",
        )


def _check_inbox_links(report: _Report, index: int, path: Path) -> None:
    """Reports an inbox reached through a link others may swap, which nbankd refuses
    at start: an error when checked as the user nbankd runs as (the deployment
    guide's check as the service), a warning when checked as root, who cannot tell
    which user nbankd will run as (it judges links for its own user)."""
    try:
        inbox_link_problem(path)
    except errors.ConfigError as err:
        key = f"inboxes[{index}].path"
        if os.geteuid() == 0:
            report.warn(key, f"{err}; nbankd refuses to start on it", hint=err.hint)
        else:
            report.add(key, f"{err}; nbankd run as this user refuses to start", hint=err.hint)


def check_against_registry(config: Config, registry: Registry) -> list[Problem]:
    """What the registry says about the configuration; problems, never raises for them.

    Against django-neurobank: the registry answers; every datatype the
    configuration names exists; every archive is registered under its name
    with scheme ``neurobank`` and its path as root (an unregistered archive with
    ``create: true`` is fine: the daemon registers it at start); and, when the
    client offers ``check_credentials()``, the credentials may add resources.

    With ``registry: embedded`` the daemon itself creates missing datatypes and
    registers missing archives at start, so those are not problems; a
    *conflicting* record (the name registered with another root, or the path
    registered under another name) still is, as start-up would fail on it.
    """
    report = _Report(config)
    http = not config.embedded
    try:
        if http:
            registry.info()
        known = {d.name for d in registry.list_datatypes()}
        if http:
            _check_datatypes(config, known, report)
        for index, archive in enumerate(config.archives):
            _check_archive(config, registry, index, archive, report)
        if http:
            _check_credentials(registry, report)
    except errors.RegistryUnavailable as err:
        report.add(
            "registry",
            f"cannot reach the registry at {registry.url}: {err}",
            hint="datatypes, archives and credentials were not checked",
            code=err.code,
        )
    except errors.RegistryAuthError as err:
        report.add("registry_auth", f"the registry refused the credentials: {err}", code=err.code)
    except errors.NotFound as err:
        report.add(
            "registry",
            f"{registry.url} does not answer like a django-neurobank registry: {err}",
            hint="the URL usually ends with /neurobank/",
            code=err.code,
        )
    except errors.RegistryError as err:
        report.add("registry", f"the registry answered with an error: {err}", code=err.code)
    return report.problems


def _dtype_uses(config: Config) -> dict[str, list[str]]:
    """datatype -> key paths that name it, in file order."""
    uses: dict[str, list[str]] = {}
    for index, inbox in enumerate(config.inboxes):
        if inbox.dtype is not None:
            uses.setdefault(inbox.dtype, []).append(f"inboxes[{index}].dtype")
        for ext, dtype in inbox.dtype_by_extension.items():
            uses.setdefault(dtype, []).append(f"inboxes[{index}].dtype_by_extension[{ext!r}]")
    for name in config.datatypes:
        uses.setdefault(name, []).append(f"datatypes[{name!r}]")
    return uses


def _check_datatypes(config: Config, known: set[str], report: _Report) -> None:
    for dtype, keys in _dtype_uses(config).items():
        if dtype in known:
            continue
        also = f" (also named by {', '.join(keys[1:])})" if len(keys) > 1 else ""
        report.add(
            keys[0],
            f"datatype {dtype!r} does not exist in the registry{also}",
            hint=f"create it: nbankctl dtype add {dtype} {config.content_type_for(dtype)}",
        )


def _check_archive(
    config: Config, registry: Registry, index: int, archive: ArchiveConfig, report: _Report
) -> None:
    key = f"archives[{index}]"
    record = registry.get_archive(archive.name)
    if record is not None:
        if not archive.has_root(record.scheme, record.root):
            report.add(
                f"{key}.path",
                f"archive {archive.name!r} is registered as {record.scheme}:{record.root}, "
                f"not {ARCHIVE_SCHEME}:{archive.path}",
                hint="fix 'path' or 'name' here, or the archive's record in the registry",
            )
        return
    by_root = registry.find_archive_by_root(archive.root, ARCHIVE_SCHEME)
    if by_root is None and resolved_path(archive.path) != archive.root:
        by_root = registry.find_archive_by_root(resolved_path(archive.path), ARCHIVE_SCHEME)
    if by_root is not None:
        report.add(
            f"{key}.name",
            f"{archive.path} is registered as archive {by_root.name!r}, not {archive.name!r}",
            hint=f"set name: {by_root.name}",
        )
    elif not config.embedded and not archive.create:
        report.add(
            key,
            f"archive {archive.name!r} ({archive.path}) is not registered",
            hint=f"register it with `nbankctl init {archive.path}`, or set create: true",
        )


def _check_credentials(registry: Registry, report: _Report) -> None:
    """Asks the client to prove its credentials can add resources.

    The HTTP client's ``check_credentials()`` is expected to send one
    authenticated request that changes nothing (``POST resources/`` with an
    empty body: 400 = accepted credentials with the add permission, 403 = not),
    and to raise :class:`~nbankd.errors.RegistryAuthError` when refused or when
    no credentials are found. Reads never carry credentials. A client without
    the method is not asked (nothing is reported).
    """
    check = getattr(registry, "check_credentials", None)
    if not callable(check):
        return  # nothing to ask without sending a write; the first deposit will tell
    try:
        check()
    except errors.RegistryAuthError as err:
        report.add(
            "registry_auth",
            f"the registry refused the credentials: {err}",
            hint="check the file named by registry_auth, $CREDENTIALS_DIRECTORY/registry "
            "or ~/.netrc; the user needs permission to add resources",
            code=err.code,
        )

"""Fetching a resource into a folder: from a stored copy on this host, or downloaded from
the registry's download location.

The locations are tried in the registry's order, as ``nbank fetch`` tries them: a
``neurobank`` location whose archive is on this host is read from there; an
``http``/``https`` location (django-neurobank lists one named ``registry`` for every
resource of a downloadable datatype, ``<scheme>://<root>/<id>/``) is downloaded.
Either way the bytes are written under a temporary name beside the target, hashed
as they arrive, and published (without replacing anything unless asked) only when
they match the registered SHA-1: a failed or interrupted fetch leaves nothing at
the target.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePath

import requests

from nbankd import __version__, errors
from nbankd.hashing import DestinationWriteError
from nbankd.registry.base import LocationRecord
from nbankd.registry.http_transport import NO_AUTH, settle_environment
from nbankd.transfer.placing import NewFile, exists_error
from nbankd.transfer.reading import FileReader, HashOnly, check_sha1, read_resource
from nbankd.transfer.sources import Source, stored_copy

#: (user, password) to retry a download with when the server asks for credentials
AuthFor = Callable[[str], tuple[str, str] | None]
_CHUNK = 1 << 20
_TIMEOUT = (10.0, 60.0)


class NotFetchable(errors.NbankdError):
    """No location of a resource could be fetched from here."""

    code = "not-fetchable"


def download_url(loc: LocationRecord) -> str | None:
    """The URL of an http(s) location, as nbank builds it; None for other schemes."""
    if loc.scheme not in ("http", "https"):
        return None
    return f"{loc.scheme}://{loc.root.rstrip('/')}/{loc.resource_name}/"


def check_extension(extension: str | None) -> str | None:
    """The suffix (``.EXT``) that ``fetch -e EXTENSION`` gives fetched files, None when
    not given; UsageError for one that is not a file suffix (a '/' in it, or only dots)."""
    if not extension:
        return None
    suffix = "." + extension.lstrip(".")
    try:
        PurePath("x").with_suffix(suffix)
    except ValueError:
        raise errors.UsageError(
            f"-e {extension!r} is not a file extension",
            hint="give an extension without '/', such as -e wav",
        ) from None
    return suffix


def target_path(dest: Path, source: Source, extension: str | None) -> Path:
    """Where ``nbank fetch`` puts a resource: DEST/<registered filename>, its suffix
    replaced by ``extension`` when given (UsageError for an extension
    :func:`check_extension` refuses; ValueError for a registered file name that is
    not a plain file name, such as ``../x``)."""
    record = source.record
    name = (record.filename if record is not None else None) or source.id
    if "/" in name or "\0" in name or name in (".", ".."):
        # a registry's answer: never a path that leads out of DEST
        raise ValueError(f"its registered file name {name!r} is not a plain file name")
    target = dest / name
    suffix = check_extension(extension)
    if suffix is not None:
        target = target.with_suffix(suffix)
    return target


@dataclass(frozen=True)
class Fetched:
    """A fetched resource: where it is, and whether it was checked against a registered
    SHA-1 (False: the registry holds none for it)."""

    path: Path
    verified: bool


def _target_error(id: str, target: Path, err: OSError) -> errors.ArchiveError:
    why = err.strerror or str(err)
    if err.errno == errno.ENAMETOOLONG:
        hint = (
            "the name is too long for that filesystem: fetch it into another (-d DEST), "
            "or give -e a shorter extension"
        )
    else:
        hint = "check -d DEST and its permissions"
    return errors.ArchiveError(f"cannot fetch '{id}' to '{target}': {why}", hint=hint)


def _dest_error(id: str, target: Path, err: OSError) -> errors.ArchiveError:
    """Writing the copy in DEST failed: DEST's problem, which no other location mends."""
    why = os.strerror(err.errno) if err.errno else str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "make room there, or fetch elsewhere with -d"
    elif err.errno == errno.EROFS:
        hint = "fetch elsewhere with -d"
    else:
        hint = "check that filesystem, or fetch elsewhere with -d"
    return errors.ArchiveError(f"cannot fetch '{id}' into '{target.parent}': {why}", hint=hint)


def _from_copy(path: Path, new: NewFile) -> str:
    if path.is_dir():
        raise NotFetchable(
            f"'{path}' is a folder resource", hint="use nbankctl export FOLDER ID to copy it"
        )

    class _Into(HashOnly):
        def file(self, relpath: str, st: os.stat_result, reader: FileReader) -> None:
            reader.copy_to(new.write)

    return read_resource(path, _Into()).sha1


def _download(url: str, new: NewFile, auth_for: AuthFor | None) -> str:
    headers = {"User-Agent": f"nbankctl/{__version__}"}
    try:
        with requests.Session() as session:
            settle_environment(session, url)
            resp = session.get(url, stream=True, timeout=_TIMEOUT, headers=headers, auth=NO_AUTH)
            creds = auth_for(url) if auth_for and resp.status_code in (401, 403) else None
            if creds is not None:
                resp.close()
                resp = session.get(url, stream=True, timeout=_TIMEOUT, headers=headers, auth=creds)
            with resp:
                if resp.status_code != 200:
                    raise NotFetchable(f"{url} answered {resp.status_code} {_detail(resp)}")
                digest = hashlib.sha1()
                for chunk in resp.iter_content(_CHUNK):
                    digest.update(chunk)
                    new.write(chunk)
                return digest.hexdigest()
    except requests.RequestException as err:
        raise errors.RegistryUnavailable(
            f"cannot download {url}: {err}", hint="check that the registry is up"
        ) from None


def _detail(resp: requests.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.reason or ""
    return str(body.get("detail", "")) if isinstance(body, dict) else ""


def fetch(
    source: Source,
    target: Path,
    *,
    replace: bool = False,
    auth_for: AuthFor | None = None,
) -> Fetched:
    """Fetches one resource to ``target`` from the first of its locations that works.

    Raises :class:`~nbankd.errors.ResourceExists` if ``target`` exists (unless
    ``replace``), ArchiveError naming the id when ``target`` cannot be looked at (a
    name too long for its filesystem), :class:`NotFetchable` when no location gives
    it, and :class:`~nbankd.transfer.reading.Mismatch` when what arrives differs from
    the registered SHA-1 (the last location's failure is the one raised). An error
    writing or publishing the copy in DEST (a full disk, a quota, a read-only or
    failing filesystem) is DEST's: ArchiveError naming DEST and the cause, raised at
    once, without trying another location.
    """
    try:
        if target.is_dir():
            raise errors.UsageError(f"'{target}' is a folder", hint="give -d DEST a folder to fill")
        if not replace and target.exists():
            raise exists_error(target)
    except OSError as err:
        raise _target_error(source.id, target, err) from err
    failure: errors.NbankdError = NotFetchable(
        f"'{source.id}' has no location this host can fetch from",
        hint="give its datatype downloads on the registry, or mount its archive here",
    )
    for loc in source.locations:
        path = stored_copy(loc)
        url = download_url(loc)
        if path is None and url is None:
            continue
        new = NewFile(target)
        try:
            try:
                if path is not None:
                    digest, shown = _from_copy(path, new), str(path)
                else:
                    assert url is not None
                    digest, shown = _download(url, new, auth_for), url
                verified = check_sha1(digest, source.sha1, shown)
            except DestinationWriteError as err:
                # DEST full, over quota, read-only or failing: no other location helps,
                # and its failure must not hide this one
                raise _dest_error(source.id, target, err) from err
            except (errors.NbankdError, OSError) as err:
                failure = err if isinstance(err, errors.NbankdError) else NotFetchable(str(err))
                continue
            # an error publishing (ResourceExists, a full disk at fsync) is DEST's too
            return Fetched(new.publish(replace=replace), verified)
        finally:
            new.discard()
    raise failure


__all__ = ["Fetched", "NotFetchable", "check_extension", "download_url", "fetch", "target_path"]

"""A client for django-neurobank's HTTP API, implementing :class:`~nbankd.registry.base.Registry`.

Facts it relies on (django-neurobank 0.12, tolerant of older servers):

- every endpoint ends with "/" (without it the server answers 301);
- reads are anonymous; credentials are sent only on writes, because production
  sites hash passwords with PBKDF2 (about a second of server CPU per request);
- list endpoints paginate with a ``Link`` header (``rel="next"``) over bare lists;
- ``bulk/resources/`` and ``bulk/locations/`` take ``{"names": [...]}`` by POST and
  answer one JSON record per line, in no useful order, omitting unknown names;
- errors: 400 field-keyed bodies (see :mod:`nbankd.registry.rejections`), 403 for
  missing, wrong or insufficient credentials (never 401), 404 for unknown things.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NoReturn
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

import requests
import requests.auth

from nbankd import errors
from nbankd.registry import rejections
from nbankd.registry.base import (
    CORE_FIELDS,
    SLUG_RE,
    ArchiveRecord,
    DataType,
    LocationRecord,
    ResourceRecord,
    full_url,
)
from nbankd.registry.credentials import Credentials

DEFAULT_TIMEOUT: tuple[float, float] = (5.0, 30.0)
BULK_BATCH = 500
USER_AGENT = "nbankd (django-neurobank client)"

_NO_CREDENTIALS = "Authentication credentials were not provided."
_BAD_CREDENTIALS = "Invalid username/password."
_CREDENTIALS_HINT = (
    "give credentials in $CREDENTIALS_DIRECTORY/registry, the registry_auth file or "
    "~/.netrc (nbankctl: -a user:pass)"
)


class _Anonymous(requests.auth.AuthBase):
    """Sends no credentials (and, being given, keeps requests from reading netrc)."""

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        return r


_NO_AUTH = _Anonymous()


def normalise_url(url: str) -> tuple[str, tuple[str, str] | None]:
    """Returns (url ending with "/" and without user:password@, the user:password if any)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise errors.ConfigError(
            f"registry URL {_safe(url)!r} is not an http(s) URL",
            hint="write it like https://host/neurobank/",
        )
    userinfo = None
    netloc = parts.netloc
    if "@" in netloc:
        creds, _, netloc = netloc.rpartition("@")
        user, _, password = creds.partition(":")
        userinfo = (user, password)
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    return urlunsplit((parts.scheme, netloc, path, "", "")), userinfo


def _safe(url: str) -> str:
    """The URL without any user:password@ part, for messages."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def _root_cause(err: BaseException) -> str:
    """A short reason for a transport error: the innermost cause, without URLs or secrets."""
    seen: set[int] = set()
    inner: BaseException = err
    while True:
        nxt = inner.__cause__ or inner.__context__
        reason = getattr(inner, "reason", None)
        if isinstance(reason, BaseException):
            nxt = nxt or reason
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(nxt))
        inner = nxt
    text = str(inner)
    # urllib3 messages look like "<conn object at 0x..>: Failed to establish ...: [Errno 111] ..."
    if ": " in text and text.startswith("<"):
        text = text.split(": ", 1)[1]
    return text or type(inner).__name__


class HttpRegistry:
    """A django-neurobank registry reached over HTTP(S)."""

    backend = "http"

    def __init__(
        self,
        url: str,
        auth: Credentials | tuple[str, str] | None = None,
        *,
        timeout: tuple[float, float] | float = DEFAULT_TIMEOUT,
        bulk_batch: int = BULK_BATCH,
    ) -> None:
        self.url, userinfo = normalise_url(url)
        if isinstance(auth, Credentials):
            self._auth: tuple[str, str] | None = auth.as_tuple()
            self._auth_source = auth.source
        elif auth is not None:
            self._auth = (auth[0], auth[1])
            self._auth_source = "the given credentials"
        elif userinfo is not None:
            self._auth = userinfo
            self._auth_source = "the registry URL"
        else:
            self._auth = None
            self._auth_source = ""
        self.timeout = timeout
        self.bulk_batch = bulk_batch
        self._session = requests.Session()
        self._session.headers["User-Agent"] = USER_AGENT
        self._session.headers["Accept"] = "application/json"
        # reads go out anonymously unless the server turns out to require auth for them
        self._reads_need_auth = False

    # --- plumbing ------------------------------------------------------------------

    def __repr__(self) -> str:
        user = f", user={self._auth[0]!r}" if self._auth else ""
        return f"HttpRegistry({self.url!r}{user})"

    def __enter__(self) -> HttpRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._session.close()

    def clone(self) -> HttpRegistry:
        """Another client for the same registry and credentials, with its own connections
        (for a worker thread)."""
        twin = HttpRegistry(self.url, self._auth, timeout=self.timeout, bulk_batch=self.bulk_batch)
        twin._auth_source = self._auth_source
        twin._reads_need_auth = self._reads_need_auth
        return twin

    @property
    def username(self) -> str | None:
        return self._auth[0] if self._auth else None

    def resource_url(self, name: str) -> str:
        return full_url(self.url, name)

    def _endpoint(self, *parts: str) -> str:
        return self.url + "".join(quote(p, safe="") + "/" for p in parts)

    def _request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        write: bool = False,
        thing: str = "",
    ) -> requests.Response:
        """Sends one request; returns 2xx and 404 answers, raises typed errors for the rest."""
        use_auth = write or self._reads_need_auth
        try:
            resp = self._session.request(
                method,
                url,
                params=params,
                json=json_body,
                # _NO_AUTH stops requests from sending ~/.netrc credentials on reads
                auth=self._auth if use_auth and self._auth else _NO_AUTH,
                timeout=self.timeout,
                allow_redirects=not write,
            )
        except requests.Timeout as err:
            raise errors.RegistryUnavailable(
                f"registry timed out: {method} {_safe(url)} ({_root_cause(err)})",
                hint=f"retry later; timeouts (connect, read) are {self.timeout} s",
            ) from None
        except requests.RequestException as err:
            raise errors.RegistryUnavailable(
                f"registry unreachable: {method} {_safe(url)}: {_root_cause(err)}",
                hint="check that the server is up and the URL is right",
            ) from None
        status = resp.status_code
        if status < 300 or status == 404:
            return resp
        if status == 403 and not use_auth and self._auth and self._detail(resp) == _NO_CREDENTIALS:
            # this site wants credentials even for reads: send them from now on
            self._reads_need_auth = True
            return self._request(
                method, url, params=params, json_body=json_body, write=write, thing=thing
            )
        self._raise_for(resp, method, url, thing)

    @staticmethod
    def _detail(resp: requests.Response) -> str:
        try:
            body = resp.json()
        except ValueError:
            return ""
        return str(body.get("detail", "")) if isinstance(body, dict) else ""

    def _raise_for(self, resp: requests.Response, method: str, url: str, thing: str) -> NoReturn:
        status = resp.status_code
        where = f"{method} {_safe(url)}"
        if status >= 500 or status in (408, 429):
            raise errors.RegistryUnavailable(
                f"registry {self.url} answered {status} {resp.reason} to {where}",
                hint="a server-side problem; retry later",
            )
        if status in (401, 403):
            detail = self._detail(resp)
            if detail == _NO_CREDENTIALS or not self._auth:
                raise errors.RegistryAuthError(
                    f"registry {self.url} refused {where}: no credentials were given",
                    hint=_CREDENTIALS_HINT,
                )
            user = self._auth[0]
            if detail == _BAD_CREDENTIALS or status == 401:
                raise errors.RegistryAuthError(
                    f"registry {self.url} refused the password of user {user!r} "
                    f"(from {self._auth_source}): invalid username/password",
                    hint="correct the credentials and try again",
                )
            raise errors.RegistryAuthError(
                f"registry {self.url} refused {where} for user {user!r}: "
                f"{detail or 'permission denied'}",
                hint="ask the registry's administrator for permission to change records",
            )
        if status == 400:
            try:
                body = resp.json()
            except ValueError:
                body = None
            if isinstance(body, dict):
                raise rejections.classify(body)
            text = resp.text.strip().replace("\n", " ")[:200]
            raise errors.RegistryRejected(
                f"registry {self.url} rejected {where}: {text or 'bad request'}"
            )
        if 300 <= status < 400:
            raise errors.RegistryError(
                f"registry {self.url} redirected {where} to {resp.headers.get('Location', '?')}",
                hint="set the registry URL to where the server lives (with a trailing slash)",
            )
        raise errors.RegistryError(
            f"registry {self.url} answered {status} {resp.reason} to {where}"
            + (f" ({thing})" if thing else "")
        )

    def _json(self, resp: requests.Response) -> Any:
        try:
            return resp.json()
        except ValueError:
            raise errors.RegistryUnavailable(
                f"registry {self.url} did not answer JSON to {resp.request.method} "
                f"{_safe(resp.url)} (status {resp.status_code})",
                hint="is this the URL of a django-neurobank registry?",
            ) from None

    def _get_one(self, url: str) -> Any | None:
        resp = self._request("GET", url)
        return None if resp.status_code == 404 else self._json(resp)

    def _write(self, method: str, url: str, body: Any = None, *, thing: str) -> requests.Response:
        resp = self._request(method, url, json_body=body, write=True, thing=thing)
        if resp.status_code == 404:
            raise errors.NotFound(f"registry {self.url} has no {thing}")
        return resp

    def _paginate(self, endpoint: str, params: Mapping[str, str]) -> Iterator[dict[str, Any]]:
        """Yields the records of a list endpoint, following ``Link: rel="next"``.

        The next page is requested on our own endpoint URL with the link's query, so a
        proxy that makes the server build http:// links for an https site does no harm.
        """
        query: dict[str, str] = dict(params)
        first = True
        while True:
            resp = self._request("GET", endpoint, params=query)
            if resp.status_code == 404:
                if not first and self._detail(resp) == "Invalid page.":
                    return  # the list shrank while we paged through it
                raise errors.NotFound(f"registry {self.url} has no {endpoint[len(self.url) :]}")
            body = self._json(resp)
            if isinstance(body, dict) and isinstance(body.get("results"), list):
                # a site configured with DRF's default body pagination
                yield from body["results"]
                nxt = body.get("next")
            elif isinstance(body, list):
                yield from body
                nxt = resp.links.get("next", {}).get("url")
            else:
                raise errors.RegistryUnavailable(
                    f"registry {self.url} answered an unexpected body to GET {endpoint}"
                )
            if not nxt:
                return
            query = dict(parse_qsl(urlsplit(nxt).query, keep_blank_values=True))
            first = False

    def _bulk(self, endpoint: str, names: Iterable[str]) -> Iterator[dict[str, Any]]:
        """Yields the records of a bulk endpoint for names, in batches; unknown names omitted."""
        wanted = list(dict.fromkeys(n for n in names if SLUG_RE.match(n)))
        url = self._endpoint(*endpoint.split("/"))
        for i in range(0, len(wanted), self.bulk_batch):
            batch = wanted[i : i + self.bulk_batch]
            resp = self._request("POST", url, json_body={"names": batch})
            if resp.status_code == 404:
                raise errors.RegistryError(
                    f"registry {self.url} has no bulk endpoint {endpoint}/",
                    hint="upgrade django-neurobank to 0.12 or later",
                )
            for line in resp.text.splitlines():
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except ValueError:
                    raise errors.RegistryUnavailable(
                        f"registry {self.url} answered a malformed line to POST {endpoint}/"
                    ) from None

    @staticmethod
    def _resource(d: Mapping[str, Any]) -> ResourceRecord:
        """A record from the wire; older servers keep experimenter/animal in metadata only."""
        data = dict(d)
        metadata = data.get("metadata")
        for f in CORE_FIELDS:
            if f not in data and isinstance(metadata, dict):
                data[f] = metadata.get(f)
        return ResourceRecord.from_json(data)

    # --- registry info ---------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        body = self._get_one(self._endpoint("info"))
        if not isinstance(body, dict):
            raise errors.RegistryError(
                f"{self.url} has no info/ endpoint",
                hint="is this the URL of a django-neurobank registry?",
            )
        return body

    def check_credentials(self) -> None:
        """Proves the credentials may add resources, changing nothing.

        Sends one authenticated ``POST resources/`` with an empty body: the server
        checks permissions before validating, so 400 (dtype required) means accepted
        and 403 means refused (:class:`~nbankd.errors.RegistryAuthError`).
        """
        if self._auth is None:
            raise errors.RegistryAuthError(
                f"no credentials were found for registry {self.url}", hint=_CREDENTIALS_HINT
            )
        try:
            self._request("POST", self._endpoint("resources"), json_body={}, write=True)
        except errors.RegistryRejected:
            return
        raise errors.RegistryError(
            f"registry {self.url} accepted an empty resource; is it django-neurobank?"
        )

    # --- datatypes -------------------------------------------------------------------

    def list_datatypes(self) -> list[DataType]:
        return [DataType.from_json(d) for d in self._paginate(self._endpoint("datatypes"), {})]

    def add_datatype(self, name: str, content_type: str = "", extension: str = "") -> DataType:
        body = {"name": name, "content_type": content_type}
        if extension:
            body["extension"] = extension
        resp = self._write("POST", self._endpoint("datatypes"), body, thing="datatypes endpoint")
        return DataType.from_json(self._json(resp))

    # --- archives ---------------------------------------------------------------------

    def list_archives(self, **filters: str) -> list[ArchiveRecord]:
        return [
            ArchiveRecord.from_json(d) for d in self._paginate(self._endpoint("archives"), filters)
        ]

    def get_archive(self, name: str) -> ArchiveRecord | None:
        if not SLUG_RE.match(name):
            return None
        body = self._get_one(self._endpoint("archives", name))
        return None if body is None else ArchiveRecord.from_json(body)

    def find_archive_by_root(self, root: str, scheme: str = "neurobank") -> ArchiveRecord | None:
        # the server's scheme filter is a prefix match: check it exactly here
        for a in self.list_archives(scheme=scheme, root=root):
            if a.scheme == scheme and a.root.lower() == root.lower():
                return a
        return None

    def add_archive(
        self, name: str, scheme: str, root: str, accessibility: str = "local"
    ) -> ArchiveRecord:
        body = {"name": name, "scheme": scheme, "root": root, "accessibility": accessibility}
        resp = self._write("POST", self._endpoint("archives"), body, thing="archives endpoint")
        return ArchiveRecord.from_json(self._json(resp))

    # --- resources --------------------------------------------------------------------

    def add_resource(
        self,
        *,
        dtype: str,
        archive: str | None,
        name: str | None = None,
        sha1: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        key: str | None = None,
    ) -> ResourceRecord:
        body: dict[str, Any] = {"dtype": dtype}
        if name is not None:
            body["name"] = name
        if sha1 is not None:
            body["sha1"] = sha1
        if archive is not None:
            body["locations"] = [archive if key is None else {"archive": archive, "key": key}]
        if metadata is not None:
            # experimenter/animal stay in metadata: API 1.2 servers move them into their
            # fields (and validate them); older servers keep them in metadata as before
            body["metadata"] = dict(metadata)
        resp = self._write("POST", self._endpoint("resources"), body, thing="resources endpoint")
        return self._resource(self._json(resp))

    def get_resource(self, name: str) -> ResourceRecord | None:
        if not SLUG_RE.match(name):
            return None
        body = self._get_one(self._endpoint("resources", name))
        return None if body is None else self._resource(body)

    def get_resources(self, names: Iterable[str]) -> list[ResourceRecord]:
        return [self._resource(d) for d in self._bulk("bulk/resources", names)]

    def search(self, **filters: str) -> Iterator[ResourceRecord]:
        params = {k: str(v) for k, v in filters.items()}
        for d in self._paginate(self._endpoint("resources"), params):
            yield self._resource(d)

    def search_pages(self, workers: int = 4, **filters: str) -> list[ResourceRecord]:
        """Like :meth:`search`, but fetches pages 2..N concurrently once the first page's
        ``Link: rel="last"`` tells N (audits list whole archives). A page that vanished
        because the list shrank meanwhile counts as empty; without a ``last`` link this
        falls back to following ``next``."""
        from concurrent.futures import ThreadPoolExecutor

        params = {k: str(v) for k, v in filters.items()}
        endpoint = self._endpoint("resources")
        resp = self._request("GET", endpoint, params=params)
        body = self._json(resp) if resp.status_code != 404 else None
        last = resp.links.get("last", {}).get("url") if isinstance(body, list) else None
        pages = dict(parse_qsl(urlsplit(last).query)).get("page", "") if last else ""
        if not isinstance(body, list) or (resp.links.get("next") and not pages.isdigit()):
            return list(self.search(**filters))

        def page(n: int) -> list[dict[str, Any]]:
            r = self._request("GET", endpoint, params={**params, "page": str(n)})
            return [] if r.status_code == 404 else list(self._json(r))

        rest = range(2, int(pages) + 1) if pages.isdigit() else range(0)
        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="registry-page") as pool:
            bodies = [body, *pool.map(page, rest)]
        return [self._resource(d) for part in bodies for d in part]

    def update_metadata(self, name: str, metadata: Mapping[str, Any]) -> ResourceRecord:
        if not SLUG_RE.match(name):
            raise errors.NotFound(f"registry {self.url} has no resource {name!r}")
        body = {"metadata": dict(metadata)}
        resp = self._write(
            "PATCH", self._endpoint("resources", name), body, thing=f"resource {name!r}"
        )
        return self._resource(self._json(resp))

    # --- locations --------------------------------------------------------------------

    def get_locations(self, name: str) -> list[LocationRecord]:
        body = (
            self._get_one(self._endpoint("resources", name, "locations"))
            if SLUG_RE.match(name)
            else None
        )
        if body is None:
            raise errors.NotFound(f"registry {self.url} has no resource {name!r}")
        return [LocationRecord.from_json(d) for d in body]

    def get_locations_bulk(self, names: Iterable[str]) -> dict[str, list[LocationRecord]]:
        """{name: locations} for the names the registry knows that have locations."""
        return {
            d["name"]: [LocationRecord.from_json(loc) for loc in d.get("locations") or ()]
            for d in self._bulk("bulk/locations", names)
        }

    def add_location(self, name: str, archive: str, key: str | None = None) -> LocationRecord:
        if not SLUG_RE.match(name):
            raise errors.NotFound(f"registry {self.url} has no resource {name!r}")
        body: dict[str, Any] = {"archive_name": archive}
        if key is not None:
            body["key"] = key
        resp = self._write(
            "POST",
            self._endpoint("resources", name, "locations"),
            body,
            thing=f"resource {name!r}",
        )
        return LocationRecord.from_json(self._json(resp))

    def remove_location(self, name: str, archive: str) -> None:
        thing = f"location of resource {name!r} in archive {archive!r}"
        if not (SLUG_RE.match(name) and SLUG_RE.match(archive)):
            raise errors.NotFound(f"registry {self.url} has no {thing}")
        self._write("DELETE", self._endpoint("resources", name, "locations", archive), thing=thing)

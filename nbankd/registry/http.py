"""A client for django-neurobank's HTTP API, implementing :class:`~nbankd.registry.base.Registry`.

:class:`HttpRegistry` maps the Registry methods to the API's endpoints; how the
requests travel (URL normalisation, credentials, anonymous reads, error mapping,
JSON, pagination and bulk batches) lives in :mod:`nbankd.registry.http_transport`.

Facts it relies on (django-neurobank 0.12, tolerant of older servers):

- every endpoint ends with "/" (without it the server answers 301);
- ``bulk/resources/`` and ``bulk/locations/`` take ``{"names": [...]}`` by POST and
  answer one JSON record per line, in no useful order, omitting unknown names;
- a POST to ``resources/`` checks permissions before validating its body;
- 404 answers unknown things; older servers keep experimenter/animal in metadata.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

from nbankd import errors
from nbankd.registry import rejections
from nbankd.registry.base import (
    CORE_FIELDS,
    SLUG_RE,
    ArchiveRecord,
    DataType,
    LocationRecord,
    MalformedRecord,
    ResourceRecord,
    as_record,
    by_root,
    core_field_as_stored,
    full_url,
    unstorable_metadata,
)
from nbankd.registry.credentials import Credentials
from nbankd.registry.http_transport import CREDENTIALS_HINT, HttpTransport

DEFAULT_TIMEOUT: tuple[float, float] = (5.0, 30.0)
BULK_BATCH = 500

T = TypeVar("T")


def _sendable(metadata: Any, *, setting: bool = False) -> dict[str, Any]:
    """``metadata`` as sent, checked first as the embedded registry checks it: what is
    not an object, or what no registry stores (a NUL character, which django-neurobank
    on PostgreSQL answers with a 500, a lone surrogate, NaN, nesting past 500 levels), is
    refused naming the key, and nothing is sent. ``setting``: an update's, whose None
    values delete keys."""
    if not isinstance(metadata, Mapping):
        raise rejections.classify({"metadata": ["metadata must be a dictionary"]})
    body = dict(metadata)
    checked = {k: v for k, v in body.items() if v is not None} if setting else body
    if why := unstorable_metadata(checked):
        raise rejections.classify({"metadata": [why]})
    return body


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
        self._http = HttpTransport(url, auth, timeout=timeout)
        self.url = self._http.url
        self.bulk_batch = bulk_batch

    # --- plumbing ------------------------------------------------------------------

    def __repr__(self) -> str:
        user = f", user={self._auth[0]!r}" if self._auth else ""
        return f"HttpRegistry({self.url!r}{user})"

    def __enter__(self) -> HttpRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def batch(self) -> AbstractContextManager[None]:
        """Each request is its own commit on the server: nothing to batch."""
        return nullcontext()

    def close(self) -> None:
        self._http.close()

    def clone(self) -> HttpRegistry:
        """Another client for the same registry and credentials, with its own connections
        (for a worker thread)."""
        twin = HttpRegistry(self.url, self._auth, timeout=self.timeout, bulk_batch=self.bulk_batch)
        twin._http.auth_source = self._http.auth_source
        twin._http.reads_need_auth = self._http.reads_need_auth
        return twin

    @property
    def timeout(self) -> tuple[float, float] | float:
        """The (connect, read) timeouts of each request, in seconds."""
        return self._http.timeout

    @timeout.setter
    def timeout(self, value: tuple[float, float] | float) -> None:
        self._http.timeout = value

    @property
    def _auth(self) -> tuple[str, str] | None:
        """The (user, password) sent on writes, or None."""
        return self._http.auth

    @property
    def username(self) -> str | None:
        return self._auth[0] if self._auth else None

    def resource_url(self, name: str) -> str:
        return full_url(self.url, name)

    @staticmethod
    def _resource(d: Any) -> ResourceRecord:
        """A record from the wire; older servers keep experimenter/animal in metadata only
        (as any JSON value: kept as text, as API 1.2 servers keep them)."""
        data = dict(as_record(d, "a resource"))
        metadata = data.get("metadata")
        for f in CORE_FIELDS:
            if f not in data and isinstance(metadata, dict):
                value = metadata.get(f)
                plain = isinstance(value, str | int | float) and not isinstance(value, bool)
                data[f] = core_field_as_stored(value) if plain else None
        return ResourceRecord.from_json(data)

    def _malformed(self, request: str, why: str) -> errors.RegistryUnavailable:
        """The error for an answer to ``request`` ("GET resources/") of the wrong shape:
        transient, as an answer that is not JSON is (a server or proxy problem, never a
        verdict on what was asked), naming the registry."""
        return errors.RegistryUnavailable(
            f"registry {self.url} answered {request} with a malformed record: {why}",
            hint="a server or proxy that does not speak django-neurobank's API? asked again later",
        )

    def _parsed(self, make: Callable[[Any], T], body: Any, request: str) -> T:
        """``make(body)``, a record of the answer to ``request``; one of the wrong shape
        (:class:`~nbankd.registry.base.MalformedRecord`) raises :meth:`_malformed`."""
        try:
            return make(body)
        except MalformedRecord as err:
            raise self._malformed(request, str(err)) from None

    def _each(self, make: Callable[[Any], T], body: Any, request: str) -> list[T]:
        """The records of a list answer to ``request`` (see :meth:`_parsed`)."""
        if not isinstance(body, list):
            raise self._malformed(request, "the answer is not a list")
        return [self._parsed(make, d, request) for d in body]

    # --- registry info ---------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        body = self._http.get_one(self._http.endpoint("info"))
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
                f"no credentials were found for registry {self.url}", hint=CREDENTIALS_HINT
            )
        try:
            self._http.request("POST", self._http.endpoint("resources"), json_body={}, write=True)
        except errors.RegistryRejected:
            return
        raise errors.RegistryError(
            f"registry {self.url} accepted an empty resource; is it django-neurobank?"
        )

    # --- datatypes -------------------------------------------------------------------

    def list_datatypes(self) -> list[DataType]:
        pages = self._http.paginate(self._http.endpoint("datatypes"), {})
        return [self._parsed(DataType.from_json, d, "GET datatypes/") for d in pages]

    def add_datatype(self, name: str, content_type: str = "", extension: str = "") -> DataType:
        body = {"name": name, "content_type": content_type}
        if extension:
            body["extension"] = extension
        resp = self._http.write(
            "POST", self._http.endpoint("datatypes"), body, thing="datatypes endpoint"
        )
        return self._parsed(DataType.from_json, self._http.decode(resp), "POST datatypes/")

    # --- archives ---------------------------------------------------------------------

    def list_archives(self, **filters: str) -> list[ArchiveRecord]:
        pages = self._http.paginate(self._http.endpoint("archives"), filters)
        return [self._parsed(ArchiveRecord.from_json, d, "GET archives/") for d in pages]

    def get_archive(self, name: str) -> ArchiveRecord | None:
        if not SLUG_RE.match(name):
            return None
        body = self._http.get_one(self._http.endpoint("archives", name))
        if body is None:
            return None
        return self._parsed(ArchiveRecord.from_json, body, f"GET archives/{name}/")

    def find_archive_by_root(self, root: str, scheme: str = "neurobank") -> ArchiveRecord | None:
        # the server's scheme filter is a prefix match, its root filter ignores case
        return by_root(self.list_archives(scheme=scheme, root=root), root, scheme)

    def add_archive(
        self, name: str, scheme: str, root: str, accessibility: str = "local"
    ) -> ArchiveRecord:
        body = {"name": name, "scheme": scheme, "root": root, "accessibility": accessibility}
        resp = self._http.write(
            "POST", self._http.endpoint("archives"), body, thing="archives endpoint"
        )
        return self._parsed(ArchiveRecord.from_json, self._http.decode(resp), "POST archives/")

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
            body["metadata"] = _sendable(metadata)
        try:
            resp = self._http.write(
                "POST", self._http.endpoint("resources"), body, thing="resources endpoint"
            )
        except errors.NotFound as err:  # the collection itself: the URL or site is wrong
            raise errors.RegistryUnavailable(
                err.message, hint="is the registry URL right (ending in /neurobank/ or so)?"
            ) from None
        record = self._parsed(self._resource, self._http.decode(resp), "POST resources/")
        if (name is not None and record.name != name) or (
            sha1 is not None and (record.sha1 or "").lower() != sha1.lower()
        ):
            # never counted as registered: the record asked for may not exist
            raise errors.RegistryUnavailable(
                f"registry {self.url} answered the registration of {name or 'a resource'} "
                f"(sha1 {sha1}) with another record: {record.name} (sha1 {record.sha1})",
                hint="a proxy or server answering for another site? it is asked again later",
            )
        return record

    def get_resource(self, name: str) -> ResourceRecord | None:
        if not SLUG_RE.match(name):
            return None
        resp = self._http.request("GET", self._http.endpoint("resources", name))
        if resp.status_code == 404:
            return None
        body = self._http.decode(resp)
        if not isinstance(body, dict):  # 200 with `null` or a list: no answer about it
            raise errors.RegistryUnavailable(
                f"registry {self.url} answered GET resources/{name}/ with no record",
                hint="a server or proxy problem; asked again later",
            )
        record = self._parsed(self._resource, body, f"GET resources/{name}/")
        if record.name != name:  # a redirect or a proxy answering for another record
            raise errors.RegistryUnavailable(
                f"registry {self.url} answered record {record.name!r} when asked for {name!r}",
                hint="a proxy or server redirecting to another record? asked again later",
            )
        return record

    def get_resources(self, names: Iterable[str]) -> list[ResourceRecord]:
        found = self._http.bulk("bulk/resources", names, self.bulk_batch)
        return [self._parsed(self._resource, d, "POST bulk/resources/") for d in found]

    def search(self, **filters: str) -> Iterator[ResourceRecord]:
        params = {k: str(v) for k, v in filters.items()}
        for d in self._http.paginate(self._http.endpoint("resources"), params):
            yield self._parsed(self._resource, d, "GET resources/")

    def search_pages(
        self, workers: int = 4, *, ahead: int = 1, **filters: str
    ) -> list[ResourceRecord]:
        """Like :meth:`search`, but fetches pages 2..N concurrently once the first page's
        ``Link: rel="last"`` tells N (audits list whole archives), and asks for pages
        2..1+``ahead`` together with the first (kept only if the first page's ``last``
        link shows they exist: an unpaginated server ignores ``page``). A page that
        vanished because the list shrank meanwhile counts as empty; without a ``last``
        link this falls back to following ``next``."""
        from concurrent.futures import Future, ThreadPoolExecutor

        params = {k: str(v) for k, v in filters.items()}
        endpoint = self._http.endpoint("resources")

        def page(n: int) -> list[dict[str, Any]]:
            r = self._http.request("GET", endpoint, params={**params, "page": str(n)})
            if r.status_code == 404:
                return []
            body = self._http.decode(r)
            if not isinstance(body, list):
                raise self._malformed(f"GET resources/ (page {n})", "the answer is not a list")
            return body

        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="registry-page") as pool:
            guessed: dict[int, Future[list[dict[str, Any]]]] = {
                n: pool.submit(page, n) for n in range(2, 2 + max(0, ahead))
            }
            resp = self._http.request("GET", endpoint, params=params)
            body = self._http.decode(resp) if resp.status_code != 404 else None
            last = resp.links.get("last", {}).get("url") if isinstance(body, list) else None
            pages = dict(parse_qsl(urlsplit(last).query)).get("page", "") if last else ""
            if not isinstance(body, list) or (resp.links.get("next") and not pages.isdigit()):
                for fut in guessed.values():
                    fut.cancel()
                return list(self.search(**filters))
            n_pages = int(pages) if pages.isdigit() else 1
            bodies = [body]
            # at most a few pages in flight, and none after an empty one: a ``last``
            # link that lies (a billion pages) costs one page more, not a billion
            pending: deque[Future[list[dict[str, Any]]]] = deque()
            n = 2
            while n <= n_pages or pending:
                while n <= n_pages and len(pending) < 2 * max(1, workers):
                    pending.append(guessed.pop(n, None) or pool.submit(page, n))
                    n += 1
                part = pending.popleft().result()
                if not part:
                    break
                bodies.append(part)
            for fut in (*pending, *guessed.values()):
                fut.cancel()
        return [self._parsed(self._resource, d, "GET resources/") for part in bodies for d in part]

    def update_metadata(self, name: str, metadata: Mapping[str, Any]) -> ResourceRecord:
        if not SLUG_RE.match(name):
            raise errors.NotFound(f"registry {self.url} has no resource {name!r}")
        body = {"metadata": _sendable(metadata, setting=True)}
        resp = self._http.write(
            "PATCH", self._http.endpoint("resources", name), body, thing=f"resource {name!r}"
        )
        return self._parsed(self._resource, self._http.decode(resp), f"PATCH resources/{name}/")

    # --- locations --------------------------------------------------------------------

    def get_locations(self, name: str) -> list[LocationRecord]:
        body = (
            self._http.get_one(self._http.endpoint("resources", name, "locations"))
            if SLUG_RE.match(name)
            else None
        )
        if body is None:
            raise errors.NotFound(f"registry {self.url} has no resource {name!r}")
        return self._each(LocationRecord.from_json, body, f"GET resources/{name}/locations/")

    def get_locations_bulk(self, names: Iterable[str]) -> dict[str, list[LocationRecord]]:
        """{name: locations} for the names the registry knows that have locations."""
        request = "POST bulk/locations/"
        return {
            d["name"]: self._each(LocationRecord.from_json, d.get("locations") or [], request)
            for d in self._http.bulk("bulk/locations", names, self.bulk_batch)
        }

    def add_location(self, name: str, archive: str, key: str | None = None) -> LocationRecord:
        if not SLUG_RE.match(name):
            raise errors.NotFound(f"registry {self.url} has no resource {name!r}")
        body: dict[str, Any] = {"archive_name": archive}
        if key is not None:
            body["key"] = key
        resp = self._http.write(
            "POST",
            self._http.endpoint("resources", name, "locations"),
            body,
            thing=f"resource {name!r}",
        )
        request = f"POST resources/{name}/locations/"
        return self._parsed(LocationRecord.from_json, self._http.decode(resp), request)

    def set_location_key(self, name: str, archive: str, key: str | None) -> LocationRecord:
        thing = f"location of resource {name!r} in archive {archive!r}"
        if not (SLUG_RE.match(name) and SLUG_RE.match(archive)):
            raise errors.NotFound(f"registry {self.url} has no {thing}")
        resp = self._http.write(
            "PATCH",
            self._http.endpoint("resources", name, "locations", archive),
            {"key": key},
            thing=thing,
        )
        request = f"PATCH resources/{name}/locations/{archive}/"
        return self._parsed(LocationRecord.from_json, self._http.decode(resp), request)

    def remove_location(self, name: str, archive: str) -> None:
        thing = f"location of resource {name!r} in archive {archive!r}"
        if not (SLUG_RE.match(name) and SLUG_RE.match(archive)):
            raise errors.NotFound(f"registry {self.url} has no {thing}")
        self._http.write(
            "DELETE", self._http.endpoint("resources", name, "locations", archive), thing=thing
        )

"""The HTTP transport of :class:`~nbankd.registry.http.HttpRegistry`: one session to a
django-neurobank server.

Here live the registry URL's normalisation (and the user:password it may carry),
the choice of credentials, :meth:`HttpTransport.request` (anonymous reads,
authenticated writes), the mapping of error answers to typed
:mod:`nbankd.errors`, JSON decoding, and the walk over paginated and bulk
endpoints. What the API's endpoints mean is left to ``http.py``.

Facts it relies on (django-neurobank 0.12, tolerant of older servers):

- reads are anonymous; credentials are sent only on writes, because production
  sites hash passwords with PBKDF2 (about a second of server CPU per request);
- list endpoints paginate with a ``Link`` header (``rel="next"``) over bare lists;
- bulk endpoints answer one JSON record per line, in no useful order;
- errors: 400 field-keyed bodies (see :mod:`nbankd.registry.rejections`), 403 for
  missing, wrong or insufficient credentials (never 401), 404 for unknown things.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NoReturn
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import requests
import requests.auth

from nbankd import errors
from nbankd.registry import rejections
from nbankd.registry.base import SLUG_RE
from nbankd.registry.credentials import Credentials

USER_AGENT = "nbankd (django-neurobank client)"

_NO_CREDENTIALS = "Authentication credentials were not provided."
_BAD_CREDENTIALS = "Invalid username/password."
CREDENTIALS_HINT = (
    "give credentials in $CREDENTIALS_DIRECTORY/registry, the registry_auth file or "
    "~/.netrc (nbankctl: -a user:pass)"
)


class _Anonymous(requests.auth.AuthBase):
    """Sends no credentials (and, being given, keeps requests from reading netrc)."""

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        return r


NO_AUTH = _Anonymous()


def settle_environment(session: requests.Session, url: str) -> None:
    """Reads the environment's proxies (HTTP(S)_PROXY, NO_PROXY, as they apply to
    ``url``) and CA bundle (REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE) into ``session`` once,
    then stops it reading the environment: requests would read it again on every
    request (about 100 us of CPU each) and, following a redirect, send ~/.netrc's
    credentials for the new host (a netrc ``default`` entry: to any host)."""
    found = session.merge_environment_settings(url, {}, None, None, None)
    session.proxies.update(found["proxies"])
    session.verify = found["verify"]
    session.trust_env = False


def normalise_url(url: str) -> tuple[str, tuple[str, str] | None]:
    """Returns (url ending with "/" and without user:password@, the user:password if any)."""
    parts = urlsplit(url.strip())
    try:
        parts.port  # noqa: B018 - raises for a port that is not a number
        garbled = "@" in parts.path or "@" in parts.query or "@" in parts.fragment
    except ValueError:
        garbled = True
    if garbled:  # a password holding "/", "?" or "#" ends the host early: never echoed
        raise errors.ConfigError(
            "a registry URL cannot be read: its port is not a number, or a password in it "
            "holds '/', '?' or '#'",
            hint="write those characters as %2F, %3F and %23, or keep the password in "
            "~/.netrc instead of the URL",
        )
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


#: the longest answer read, in bytes (a record, a page, a bulk batch: far less)
MAX_ANSWER = 32 << 20
#: an answer's body is read within this many read timeouts in all
TOTAL_TIMEOUTS = 4


def _whole(streamed: requests.Response, body: bytes) -> requests.Response:
    """A response like ``streamed`` (its status, headers, URL, request) whose body is
    ``body``, read already: its ``json()``, ``text`` and ``content`` work as usual."""
    resp = requests.Response()
    resp.status_code = streamed.status_code
    resp.headers = streamed.headers
    resp.url = streamed.url
    resp.reason = streamed.reason
    resp.request = streamed.request
    resp.encoding = streamed.encoding
    resp.history = streamed.history
    resp.elapsed = streamed.elapsed
    resp.raw = io.BytesIO(body)
    return resp


class HttpTransport:
    """Requests to one registry URL over one :class:`requests.Session`, errors typed.

    ``auth`` is the (user, password) sent on writes (and on reads once the server
    turns out to want it), ``auth_source`` says where it came from, for messages.
    """

    def __init__(
        self,
        url: str,
        auth: Credentials | tuple[str, str] | None,
        *,
        timeout: tuple[float, float] | float,
    ) -> None:
        self.url, userinfo = normalise_url(url)
        if isinstance(auth, Credentials):
            self.auth: tuple[str, str] | None = auth.as_tuple()
            self.auth_source = auth.source
        elif auth is not None:
            self.auth = (auth[0], auth[1])
            self.auth_source = "the given credentials"
        elif userinfo is not None:
            self.auth = userinfo
            self.auth_source = "the registry URL"
        else:
            self.auth = None
            self.auth_source = ""
        self.timeout = timeout
        self._session = requests.Session()
        settle_environment(self._session, self.url)
        self._session.headers["User-Agent"] = USER_AGENT
        self._session.headers["Accept"] = "application/json"
        # reads go out anonymously unless the server turns out to require auth for them
        self.reads_need_auth = False

    def close(self) -> None:
        self._session.close()

    def endpoint(self, *parts: str) -> str:
        """The URL of an endpoint below the registry URL, each part quoted, ending with "/"."""
        return self.url + "".join(quote(p, safe="") + "/" for p in parts)

    def request(
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
        use_auth = write or self.reads_need_auth
        try:
            streamed = self._session.request(
                method,
                url,
                params=params,
                json=json_body,
                # NO_AUTH stops requests from sending ~/.netrc credentials on reads
                auth=self.auth if use_auth and self.auth else NO_AUTH,
                timeout=self.timeout,
                allow_redirects=not write,
                stream=True,  # the body is read here, bounded in time and size
            )
            try:
                resp = _whole(streamed, self._read_body(streamed, method, url))
            finally:
                streamed.close()
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
        if status == 403 and not use_auth and self.auth and self._detail(resp) == _NO_CREDENTIALS:
            # this site wants credentials even for reads: send them from now on
            self.reads_need_auth = True
            return self.request(
                method, url, params=params, json_body=json_body, write=write, thing=thing
            )
        self._raise_for(resp, method, url, thing)

    def _read_body(self, resp: requests.Response, method: str, url: str) -> bytes:
        """The answer's body, read within :data:`TOTAL_TIMEOUTS` read timeouts in all and
        at most :data:`MAX_ANSWER` bytes: a server or proxy that trickles an answer, or
        sends one without end, never holds a worker or fills memory."""
        read_timeout = self.timeout[1] if isinstance(self.timeout, tuple) else self.timeout
        deadline = time.monotonic() + TOTAL_TIMEOUTS * read_timeout
        raw = resp.raw
        read1 = getattr(raw, "read1", None)  # urllib3 2: what has arrived, at most n bytes
        chunks: Iterator[bytes] = (
            iter(lambda: read1(1 << 16), b"") if read1 is not None else resp.iter_content(1 << 16)
        )
        body = bytearray()
        for chunk in chunks:
            body += chunk
            if len(body) > MAX_ANSWER:
                raise errors.RegistryUnavailable(
                    f"registry {self.url} answered {method} {_safe(url)} with more than "
                    f"{MAX_ANSWER >> 20} MiB: not read further",
                    hint="a server or proxy problem; asked again later",
                )
            if time.monotonic() > deadline:
                raise errors.RegistryUnavailable(
                    f"registry {self.url} took more than {TOTAL_TIMEOUTS * read_timeout:g} s "
                    f"to answer {method} {_safe(url)} ({len(body)} bytes so far)",
                    hint="a slow or stalled server or proxy; asked again later",
                )
        return bytes(body)

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
            if detail == _NO_CREDENTIALS or not self.auth:
                raise errors.RegistryAuthError(
                    f"registry {self.url} refused {where}: no credentials were given",
                    hint=CREDENTIALS_HINT,
                )
            user = self.auth[0]
            if detail == _BAD_CREDENTIALS or status == 401:
                raise errors.RegistryAuthError(
                    f"registry {self.url} refused the password of user {user!r} "
                    f"(from {self.auth_source}): invalid username/password",
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
            # not the API's field errors: a proxy's or the site's own answer (Django's
            # DisallowedHost, say), no judgement of what was sent
            text = resp.text.strip().replace("\n", " ")[:200]
            raise errors.RegistryError(
                f"registry {self.url} answered 400 to {where} without field errors: "
                f"{text or 'bad request'}",
                hint="a site or proxy problem (its ALLOWED_HOSTS, the URL)? deposits wait",
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

    def decode(self, resp: requests.Response) -> Any:
        """The JSON body of an answer; RegistryUnavailable if it is not JSON."""
        try:
            return resp.json()
        except ValueError:
            raise errors.RegistryUnavailable(
                f"registry {self.url} did not answer JSON to {resp.request.method} "
                f"{_safe(resp.url)} (status {resp.status_code})",
                hint="is this the URL of a django-neurobank registry?",
            ) from None

    def get_one(self, url: str) -> Any | None:
        """The decoded body of a GET, or None on 404."""
        resp = self.request("GET", url)
        return None if resp.status_code == 404 else self.decode(resp)

    def write(self, method: str, url: str, body: Any = None, *, thing: str) -> requests.Response:
        """Sends an authenticated write; 404 raises NotFound naming ``thing``."""
        resp = self.request(method, url, json_body=body, write=True, thing=thing)
        if resp.status_code == 404:
            raise errors.NotFound(f"registry {self.url} has no {thing}")
        return resp

    def paginate(self, endpoint: str, params: Mapping[str, str]) -> Iterator[dict[str, Any]]:
        """Yields the records of a list endpoint, following ``Link: rel="next"``.

        The next page is requested on our own endpoint URL with the link's query, so a
        proxy that makes the server build http:// links for an https site does no harm.
        A next page asked for already (a link back to itself or to an earlier page)
        raises RegistryUnavailable: a listing never loops.
        """
        query: dict[str, str] = dict(params)
        first = True
        asked: set[tuple[tuple[str, str], ...]] = set()
        while True:
            key = tuple(sorted(query.items()))
            if key in asked:
                raise errors.RegistryUnavailable(
                    f"registry {self.url} links GET {endpoint} back to a page already read "
                    f"({urlencode(query)}): its listing would never end",
                    hint="a server or proxy problem; asked again later",
                )
            asked.add(key)
            resp = self.request("GET", endpoint, params=query)
            if resp.status_code == 404:
                if not first and self._detail(resp) == "Invalid page.":
                    return  # the list shrank while we paged through it
                raise errors.NotFound(f"registry {self.url} has no {endpoint[len(self.url) :]}")
            body = self.decode(resp)
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

    def bulk(self, endpoint: str, names: Iterable[str], batch: int) -> Iterator[dict[str, Any]]:
        """Yields the records of a bulk endpoint for names, ``batch`` names per request;
        unknown names omitted, and records of names not asked for left out."""
        wanted = list(dict.fromkeys(n for n in names if SLUG_RE.match(n)))
        url = self.endpoint(*endpoint.split("/"))
        for i in range(0, len(wanted), batch):
            asked = set(wanted[i : i + batch])
            resp = self.request("POST", url, json_body={"names": wanted[i : i + batch]})
            if resp.status_code == 404:
                raise errors.RegistryError(
                    f"registry {self.url} has no bulk endpoint {endpoint}/",
                    hint="upgrade django-neurobank to 0.12 or later",
                )
            for line in resp.text.splitlines():
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if not isinstance(record, dict) or not isinstance(record.get("name"), str):
                    raise errors.RegistryUnavailable(
                        f"registry {self.url} answered a malformed line to POST {endpoint}/: "
                        "not a record with a name",
                        hint="a server or proxy problem; asked again later",
                    )
                if record["name"] in asked:
                    yield record  # a record for a name not asked for is no answer

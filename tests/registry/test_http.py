"""HttpRegistry only: credentials, transport errors, pagination, bulk batches, credential files.

Against the session's real django-neurobank where it can answer, and against tiny
loopback HTTP servers for answers it never gives (500s, silence, foreign Link hosts).
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from fixtures.django_server import DjangoServer, unique_name
from nbankd import errors
from nbankd.registry import credentials
from nbankd.registry.http import HttpRegistry

# --- loopback stubs ----------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    authorization: str | None
    body: bytes


@dataclass
class Stub:
    """A loopback HTTP server; ``respond(method, path)`` gives (status, headers, body)."""

    respond: Callable[[str, str], tuple[int, dict[str, str], bytes]]
    seen: list[Seen] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def stub() -> Iterator[Callable[..., Stub]]:
    servers: list[ThreadingHTTPServer] = []

    def start(respond: Callable[[str, str], tuple[int, dict[str, str], bytes]]) -> Stub:
        st = Stub(respond)

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                st.seen.append(
                    Seen(self.command, self.path, self.headers.get("Authorization"), body)
                )
                status, headers, out = st.respond(self.command, self.path)
                self.send_response(status)
                for k, v in {"Content-Length": str(len(out)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = do_PATCH = do_DELETE = _any

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        servers.append(server)
        threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
        st.url = f"http://127.0.0.1:{server.server_address[1]}/neurobank/"
        return st

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def json_answer(status: int, body: Any, **headers: str) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json", **headers}, json.dumps(body).encode()


def record(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "sha1": None, "dtype": "d", "locations": [], **extra}


@pytest.fixture
def admin(django_registry: DjangoServer) -> Iterator[HttpRegistry]:
    with HttpRegistry(django_registry.url, django_registry.auth) as reg:
        yield reg


@pytest.fixture
def seeded(django_registry: DjangoServer, tmp_path: Path) -> tuple[str, str, str]:
    """(dtype, archive, resource name) freshly made on the server with plain requests."""
    dtype = django_registry.add_datatype()
    root = tmp_path / "arch"
    archive = django_registry.add_archive(str(root))
    name = unique_name("r")
    django_registry.post("resources/", {"name": name, "dtype": dtype, "locations": [archive]})
    return dtype, archive, name


# --- credentials only on writes ----------------------------------------------------


def test_reads_never_send_credentials(
    django_registry: DjangoServer, seeded: tuple[str, str, str], tmp_path: Path
) -> None:
    """With wrong credentials every read still works (the server 403s them), writes fail."""
    dtype, archive, name = seeded
    wrong = ("nbtest-admin", "wrong-password")
    r = requests.get(django_registry.url + "datatypes/", auth=wrong, timeout=10)
    assert r.status_code == 403  # so a read that sent them would fail
    with HttpRegistry(django_registry.url, wrong) as reg:
        assert reg.info()["name"] == "django-neurobank"
        assert reg.get_resource(name) is not None
        assert [r.name for r in reg.search(dtype=dtype)] == [name]
        assert dtype in [d.name for d in reg.list_datatypes()]
        assert reg.get_archive(archive) is not None
        assert archive in [a.name for a in reg.list_archives()]
        assert reg.find_archive_by_root(str(tmp_path / "arch")) is not None
        assert [r.name for r in reg.get_resources([name])] == [name]
        assert list(reg.get_locations_bulk([name])) == [name]
        assert reg.get_locations(name)[0].archive_name == archive
        with pytest.raises(errors.RegistryAuthError):
            reg.add_datatype(unique_name("dt"))


def test_authorization_header_only_on_writes(stub: Callable[..., Stub]) -> None:
    """Only POST/PATCH/DELETE writes carry an Authorization header; bulk reads do not."""

    def respond(method: str, path: str) -> tuple[int, dict[str, str], bytes]:
        if path.startswith("/neurobank/bulk/"):
            return 200, {"Content-Type": "text/html"}, b""
        if method == "DELETE":
            return 204, {}, b""
        if path.startswith("/neurobank/resources/r1/locations/"):
            return json_answer(200, [])
        if method == "GET" and path.startswith("/neurobank/resources/r1/"):
            return json_answer(200, record("r1"))
        if method == "GET":
            return json_answer(200, [])
        if method == "PATCH":
            return json_answer(200, record("r1"))
        return json_answer(201, {"name": "d", "content_type": ""})

    st = stub(respond)
    with HttpRegistry(st.url, ("u", "p")) as reg:
        reg.get_resource("r1")
        list(reg.search(name="x"))
        reg.get_resources(["r1"])
        reg.get_locations_bulk(["r1"])
        reg.get_locations("r1")
        reg.list_archives()
        reg.add_datatype("d")
        reg.update_metadata("r1", {"a": 1})
        reg.remove_location("r1", "arch")
    sent = {(s.method, s.path.split("?")[0]): s.authorization is not None for s in st.seen}
    assert sent == {
        ("GET", "/neurobank/resources/r1/"): False,
        ("GET", "/neurobank/resources/"): False,
        ("POST", "/neurobank/bulk/resources/"): False,
        ("POST", "/neurobank/bulk/locations/"): False,
        ("GET", "/neurobank/resources/r1/locations/"): False,
        ("GET", "/neurobank/archives/"): False,
        ("POST", "/neurobank/datatypes/"): True,
        ("PATCH", "/neurobank/resources/r1/"): True,
        ("DELETE", "/neurobank/resources/r1/locations/arch/"): True,
    }


def test_reads_ignore_netrc(
    django_registry: DjangoServer,
    seeded: tuple[str, str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A wrong ~/.netrc entry is not sent on reads (requests would send it by default)."""
    bad = tmp_path / "netrc"
    bad.write_text(f"machine {django_registry.host} login nbtest-admin password wrong\n")
    monkeypatch.setenv("NETRC", str(bad))
    with HttpRegistry(django_registry.url) as reg:
        assert reg.get_resource(seeded[2]) is not None


# --- authentication errors -----------------------------------------------------------


def test_write_without_credentials(django_registry: DjangoServer) -> None:
    """A write without credentials is RegistryAuthError saying none were given."""
    with HttpRegistry(django_registry.url) as reg, pytest.raises(errors.RegistryAuthError) as exc:
        reg.add_datatype(unique_name("dt"))
    assert "no credentials" in str(exc.value)
    assert exc.value.exit_code == errors.EXIT_UNREACHABLE


def test_wrong_password_hidden(django_registry: DjangoServer) -> None:
    """A wrong password is RegistryAuthError naming the user, never the password."""
    secret = "s3cret-" + unique_name("pw")
    with HttpRegistry(django_registry.url, (django_registry.username, secret)) as reg:
        with pytest.raises(errors.RegistryAuthError) as exc:
            reg.add_datatype(unique_name("dt"))
        assert secret not in repr(reg)
    text = f"{exc.value} {exc.value!r} {exc.value.hint}"
    assert "invalid username/password" in text and django_registry.username in text
    assert secret not in text


def test_user_without_permission(django_registry: DjangoServer) -> None:
    """A valid user without model permissions gets RegistryAuthError naming the user."""
    auth = (django_registry.reader_username, django_registry.reader_password)
    with (
        HttpRegistry(django_registry.url, auth) as reg,
        pytest.raises(errors.RegistryAuthError) as exc,
    ):
        reg.add_datatype(unique_name("dt"))
    assert django_registry.reader_username in str(exc.value)
    assert "permission" in str(exc.value)


def test_write_with_credentials_from_url(django_registry: DjangoServer) -> None:
    """user:password@ in the URL is used for writes and stripped from url and repr."""
    u = django_registry.url.replace(
        "http://", f"http://{django_registry.username}:{django_registry.password}@"
    )
    with HttpRegistry(u.rstrip("/")) as reg:
        assert reg.url == django_registry.url
        assert django_registry.password not in repr(reg)
        name = unique_name("dt")
        assert reg.add_datatype(name).name == name


def test_check_credentials(django_registry: DjangoServer) -> None:
    """check_credentials passes for a user who may add resources."""
    with HttpRegistry(django_registry.url, django_registry.auth) as reg:
        reg.check_credentials()


@pytest.mark.parametrize("who", ["none", "wrong", "reader"])
def test_check_credentials_refused(django_registry: DjangoServer, who: str) -> None:
    """check_credentials raises RegistryAuthError for none, wrong or powerless credentials."""
    auth = {
        "none": None,
        "wrong": (django_registry.username, "wrong"),
        "reader": (django_registry.reader_username, django_registry.reader_password),
    }[who]
    with HttpRegistry(django_registry.url, auth) as reg, pytest.raises(errors.RegistryAuthError):
        reg.check_credentials()


# --- transport errors -----------------------------------------------------------------


def test_unreachable_port() -> None:
    """Connection refused is RegistryUnavailable naming the URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        url = f"http://127.0.0.1:{s.getsockname()[1]}/neurobank/"
        with (
            HttpRegistry(url, ("u", "hunter2")) as reg,
            pytest.raises(errors.RegistryUnavailable) as exc,
        ):
            reg.add_datatype("d")
    assert url in str(exc.value) and "hunter2" not in str(exc.value)
    assert exc.value.transient


def test_server_error(stub: Callable[..., Stub]) -> None:
    """A 5xx answer is RegistryUnavailable naming the URL and status."""
    st = stub(lambda m, p: (500, {"Content-Type": "text/html"}, b"<h1>Server Error</h1>"))
    with HttpRegistry(st.url) as reg, pytest.raises(errors.RegistryUnavailable) as exc:
        reg.get_resource("abc")
    assert st.url in str(exc.value) and "500" in str(exc.value)


def test_timeout() -> None:
    """A server that accepts but never answers is RegistryUnavailable after the read timeout."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)  # the kernel completes connections; nobody ever answers
        url = f"http://127.0.0.1:{s.getsockname()[1]}/neurobank/"
        with (
            HttpRegistry(url, timeout=(2, 0.3)) as reg,
            pytest.raises(errors.RegistryUnavailable) as exc,
        ):
            reg.info()
    assert "timed out" in str(exc.value) and url in str(exc.value)


def test_non_json_400(stub: Callable[..., Stub]) -> None:
    """A 400 whose body is not JSON (a site's or proxy's page) is a RegistryError naming
    it, not a refusal of what was sent (RegistryRejected)."""
    st = stub(lambda m, p: (400, {"Content-Type": "text/html"}, b"<p>Bad Request</p>"))
    with HttpRegistry(st.url, ("u", "p")) as reg, pytest.raises(errors.RegistryError) as exc:
        reg.add_datatype("d")
    assert "Bad Request" in str(exc.value) and not isinstance(exc.value, errors.RegistryRejected)


def test_rejection_is_typed(admin: HttpRegistry) -> None:
    """A 400 from the server comes back as the classified error with its fields."""
    with pytest.raises(errors.UnknownDatatype) as exc:
        admin.add_resource(dtype=unique_name("nodt"), archive=None)
    assert list(exc.value.fields) == ["dtype"] and not exc.value.transient


def test_url_must_be_http() -> None:
    """A registry URL that is not http(s) is a ConfigError."""
    with pytest.raises(errors.ConfigError):
        HttpRegistry("ftp://host/neurobank/")


# --- pagination and bulk ------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://nbtest-admin:pa/ss@127.0.0.1:1/neurobank/",
        "http://nbtest-admin:pa?ss@127.0.0.1:1/neurobank/",
        "http://nbtest-admin:pa#ss@127.0.0.1:1/neurobank/",
        "http://127.0.0.1:port/neurobank/",
    ],
)
def test_a_url_whose_password_ends_the_host_early_is_refused_unsaid(url: str) -> None:
    """A password holding '/', '?' or '#' (or a port that is not a number) is a
    ConfigError that never repeats the URL, so never the password."""
    with pytest.raises(errors.ConfigError) as caught:
        HttpRegistry(url)
    said = str(caught.value)
    assert "nbtest-admin" not in said and "ss@" not in said and "127.0.0.1" not in said
    assert "%2F" in said


def test_pagination_uses_own_host(stub: Callable[..., Stub]) -> None:
    """Next pages are fetched from our URL with the Link's query, whatever host it names."""

    def respond(method: str, path: str) -> tuple[int, dict[str, str], bytes]:
        if "page=2" in path:
            return json_answer(200, [record("b")])
        link = '<http://internal.invalid:8000/neurobank/resources/?page=2&dtype=d>; rel="next"'
        return json_answer(200, [record("a")], Link=link)

    st = stub(respond)
    with HttpRegistry(st.url) as reg:
        assert [r.name for r in reg.search(dtype="d")] == ["a", "b"]
    assert st.seen[1].path in (
        "/neurobank/resources/?page=2&dtype=d",
        "/neurobank/resources/?dtype=d&page=2",
    )


def test_page_past_end_stops(stub: Callable[..., Stub]) -> None:
    """A next page that no longer exists (404 Invalid page.) ends the listing."""

    def respond(method: str, path: str) -> tuple[int, dict[str, str], bytes]:
        if "page=3" in path:
            return json_answer(404, {"detail": "Invalid page."})
        if "page=2" in path:
            return json_answer(200, [record("b")], Link=f'<{st.url}resources/?page=3>; rel="next"')
        return json_answer(200, [record("a")], Link=f'<{st.url}resources/?page=2>; rel="next"')

    st = stub(respond)
    with HttpRegistry(st.url) as reg:
        assert [r.name for r in reg.search()] == ["a", "b"]


def test_page_asked_ahead_of_an_unpaginated_server_is_not_counted(
    stub: Callable[..., Stub],
) -> None:
    """A server that ignores ``page`` (no Link) is listed once, though page 2 was asked."""
    st = stub(lambda method, path: json_answer(200, [record("a"), record("b")]))
    with HttpRegistry(st.url) as reg:
        assert [r.name for r in reg.search_pages(archive="x")] == ["a", "b"]
    assert any("page=2" in seen.path for seen in st.seen)  # it was asked ahead, then dropped


def test_pages_asked_ahead_are_kept_only_up_to_the_last_link(stub: Callable[..., Stub]) -> None:
    """Pages named by the first page's ``last`` link are all listed, each once, in order."""

    def respond(method: str, path: str) -> tuple[int, dict[str, str], bytes]:
        for n in (2, 3):
            if f"page={n}" in path:
                return json_answer(200, [record(f"p{n}")])
        if "page=" in path:
            return json_answer(404, {"detail": "Invalid page."})
        return json_answer(200, [record("p1")], Link=f'<{st.url}resources/?page=3>; rel="last"')

    st = stub(respond)
    with HttpRegistry(st.url) as reg:
        names = [r.name for r in reg.search_pages(archive="x", ahead=3)]
    assert names == ["p1", "p2", "p3"]  # page 4, asked ahead, answered 404 and is dropped


def test_reads_authenticate_when_site_requires(stub: Callable[..., Stub]) -> None:
    """A site that refuses anonymous reads gets credentials on reads too, after one 403."""

    def respond(method: str, path: str) -> tuple[int, dict[str, str], bytes]:
        if st.seen[-1].authorization is None:
            return json_answer(403, {"detail": "Authentication credentials were not provided."})
        return json_answer(200, [record("a")])

    st = stub(respond)
    with HttpRegistry(st.url) as anonymous, pytest.raises(errors.RegistryAuthError):
        list(anonymous.search())
    with HttpRegistry(st.url, ("u", "p")) as reg:
        assert [r.name for r in reg.search()] == ["a"]
        assert [r.name for r in reg.search()] == ["a"]
    assert [s.authorization is not None for s in st.seen] == [False, False, True, True]


def test_bulk_in_batches(admin: HttpRegistry, seeded: tuple[str, str, str]) -> None:
    """Bulk lookups larger than a batch are split and merged."""
    dtype, archive, _ = seeded
    made = [admin.add_resource(dtype=dtype, archive=archive).name for _ in range(5)]
    admin.bulk_batch = 2
    assert sorted(r.name for r in admin.get_resources([*made, "nope"])) == sorted(made)
    assert sorted(admin.get_locations_bulk(made)) == sorted(made)


def test_bulk_batch_size_on_wire(stub: Callable[..., Stub]) -> None:
    """Each bulk request carries at most bulk_batch names."""
    st = stub(lambda m, p: (200, {"Content-Type": "text/html"}, b""))
    with HttpRegistry(st.url, bulk_batch=2) as reg:
        reg.get_resources([f"n{i}" for i in range(5)])
    assert [len(json.loads(s.body)["names"]) for s in st.seen] == [2, 2, 1]


def test_old_server_record(stub: Callable[..., Stub]) -> None:
    """Records without experimenter/animal/filename fields (older servers) read from metadata."""
    old = {
        "name": "r1",
        "sha1": None,
        "dtype": "d",
        "locations": ["a"],
        "metadata": {"experimenter": "dmeliza", "animal": "b1"},
    }
    st = stub(lambda m, p: json_answer(200, old))
    with HttpRegistry(st.url) as reg:
        rec = reg.get_resource("r1")
    assert rec is not None and (rec.experimenter, rec.animal, rec.filename) == (
        "dmeliza",
        "b1",
        None,
    )


# --- credentials ------------------------------------------------------------------------------


def test_parse_user_password() -> None:
    """user:password splits at the first colon; the password may contain colons."""
    c = credentials.parse_user_password("alice:pa:ss\n")
    assert c.as_tuple() == ("alice", "pa:ss")


def test_credentials_repr_hides_password() -> None:
    """Neither repr nor str of credentials shows the password."""
    c = credentials.parse_user_password("alice:hunter2")
    assert "hunter2" not in repr(c) and "hunter2" not in str(c) and "alice" in repr(c)


def test_cli_credentials_warn() -> None:
    """-a user:pass credentials carry the argv-visibility warning."""
    assert credentials.cli_credentials("a:b").warning == credentials.ARGV_WARNING


@pytest.mark.parametrize("bad", ["alice", ":pw", "alice:", ""])
def test_malformed_user_password(bad: str) -> None:
    """A user:password string without both parts is a ConfigError."""
    with pytest.raises(errors.ConfigError):
        credentials.parse_user_password(bad)


def _write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


URL = "https://registry.example.org/neurobank/"


def test_credentials_directory(tmp_path: Path) -> None:
    """$CREDENTIALS_DIRECTORY/registry (user:password) comes first."""
    cd = tmp_path / "creds"
    cd.mkdir()
    _write(cd / "registry", "svc:one\n")
    auth = _write(tmp_path / "auth", "other:two\n")
    c = credentials.resolve(URL, registry_auth=auth, environ={"CREDENTIALS_DIRECTORY": str(cd)})
    assert c is not None and c.as_tuple() == ("svc", "one") and c.source == str(cd / "registry")


def test_credentials_directory_netrc(tmp_path: Path) -> None:
    """$CREDENTIALS_DIRECTORY/registry may be in netrc format."""
    cd = tmp_path / "creds"
    cd.mkdir()
    _write(cd / "registry", "machine registry.example.org login svc password one\n")
    c = credentials.resolve(URL, environ={"CREDENTIALS_DIRECTORY": str(cd)}, home=tmp_path)
    assert c is not None and c.as_tuple() == ("svc", "one")


def test_registry_auth_before_netrc(tmp_path: Path) -> None:
    """Without a systemd credential, the registry_auth file beats ~/.netrc."""
    _write(tmp_path / ".netrc", "machine registry.example.org login n password n\n")
    auth = _write(tmp_path / "auth", "alice:pw\n")
    c = credentials.resolve(
        URL,
        registry_auth=auth,
        environ={"CREDENTIALS_DIRECTORY": str(tmp_path / "none")},
        home=tmp_path,
    )
    assert c is not None and c.as_tuple() == ("alice", "pw")


def test_registry_auth_netrc_format(tmp_path: Path) -> None:
    """A registry_auth file in netrc format gives the entry for the registry's host."""
    auth = _write(
        tmp_path / "auth",
        "machine other.org login x password y\n"
        "machine registry.example.org login bob password pw\n",
    )
    c = credentials.resolve(URL, registry_auth=auth, environ={}, home=tmp_path)
    assert c is not None and c.as_tuple() == ("bob", "pw")


def test_home_netrc(tmp_path: Path) -> None:
    """Without other sources, ~/.netrc's entry for the host is used."""
    _write(tmp_path / ".netrc", "machine registry.example.org login carol password pw\n")
    c = credentials.resolve(URL, environ={}, home=tmp_path)
    assert c is not None and c.as_tuple() == ("carol", "pw")


def test_netrc_env(tmp_path: Path) -> None:
    """$NETRC names the netrc file, as for requests and curl."""
    p = _write(tmp_path / "n", "machine registry.example.org login dan password pw\n")
    c = credentials.resolve(URL, environ={"NETRC": str(p)}, home=tmp_path / "nohome")
    assert c is not None and c.username == "dan"


def test_no_credentials(tmp_path: Path) -> None:
    """With no source at all, resolve gives None (reads still work)."""
    assert credentials.resolve(URL, environ={}, home=tmp_path) is None


def test_cli_auth_first(tmp_path: Path) -> None:
    """nbankctl -a user:pass wins over files."""
    _write(tmp_path / ".netrc", "machine registry.example.org login n password n\n")
    c = credentials.resolve(URL, cli_auth="eve:pw", environ={}, home=tmp_path)
    assert c is not None and c.as_tuple() == ("eve", "pw")


def test_no_entry_for_host(tmp_path: Path) -> None:
    """A netrc registry_auth without the host is a ConfigError naming file and host."""
    auth = _write(tmp_path / "auth", "machine other.org login x password topsecret\n")
    with pytest.raises(errors.ConfigError) as exc:
        credentials.resolve(URL, registry_auth=auth, environ={})
    assert str(auth) in str(exc.value) and "registry.example.org" in str(exc.value)
    assert "topsecret" not in str(exc.value)


@pytest.mark.parametrize(
    "text",
    [
        "just-a-secret-word\n",
        "alice:pw\nbob:topsecret\n",
        "machine registry.example.org login u password p\ntopsecret\n",
    ],
    ids=["no-colon", "two-lines", "bad-netrc"],
)
def test_malformed_file(tmp_path: Path, text: str) -> None:
    """A malformed credentials file is a ConfigError naming the file, not its content."""
    auth = _write(tmp_path / "auth", text)
    with pytest.raises(errors.ConfigError) as exc:
        credentials.resolve(URL, registry_auth=auth, environ={})
    msg = f"{exc.value} {exc.value!r}"
    assert str(auth) in msg
    assert "secret" not in msg and "bob" not in msg


def test_missing_registry_auth(tmp_path: Path) -> None:
    """A configured registry_auth file that does not exist is a ConfigError."""
    with pytest.raises(errors.ConfigError) as exc:
        credentials.resolve(URL, registry_auth=tmp_path / "nope", environ={})
    assert str(tmp_path / "nope") in str(exc.value)


def test_unreadable_registry_auth(tmp_path: Path) -> None:
    """An unreadable registry_auth (here a directory) is a ConfigError naming it."""
    with pytest.raises(errors.ConfigError) as exc:
        credentials.load_file(tmp_path, "registry.example.org")
    assert "cannot read" in str(exc.value) and str(tmp_path) in str(exc.value)


def test_group_readable_warns(tmp_path: Path) -> None:
    """A credentials file readable by group or others carries a warning; 0600 does not."""
    loose = _write(tmp_path / "loose", "a:b\n", 0o640)
    tight = _write(tmp_path / "tight", "a:b\n", 0o600)
    warning = credentials.load_file(loose, "h").warning
    assert warning is not None and str(loose) in warning and "b\n" not in warning
    assert credentials.load_file(tight, "h").warning is None


def test_netrc_credentials_write(django_registry: DjangoServer, tmp_path: Path) -> None:
    """Credentials resolved from a netrc file let HttpRegistry write to the server."""
    django_registry.write_netrc(tmp_path / ".netrc")
    creds = credentials.resolve(django_registry.url, environ={}, home=tmp_path)
    assert creds is not None and creds.username == django_registry.username
    with HttpRegistry(django_registry.url, creds) as reg:
        name = unique_name("dt")
        assert reg.add_datatype(name).name == name

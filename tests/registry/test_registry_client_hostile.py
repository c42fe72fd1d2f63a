"""HttpRegistry and the deposit's lookup/register steps facing a broken or hostile
django-neurobank server, or a proxy in between (hostile review of the HTTP client).

Each test runs a tiny loopback HTTP server that answers what the real server never
would: a 2xx naming another record, a redirect to another record, a proxy's own
404/405/407, a Link that loops, a body that trickles or never ends. Tests marked
"guard" pass today and pin behaviour that held up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from fixtures.steps_env import Env, env_on
from nbankd import errors
from nbankd.archive import opening
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import FINAL, State, Step, next_step
from nbankd.registry.http import HttpRegistry

DTYPE = "test-file"
ARCHIVE = "arch"

# --- a loopback server that answers whatever the test says ---------------------------


@dataclass
class Request:
    method: str
    path: str
    authorization: str | None
    host: str | None
    body: bytes


@dataclass
class Hostile:
    """``respond(request, handler)`` writes the whole answer itself (see :func:`send`)."""

    respond: Callable[[Request, BaseHTTPRequestHandler], None]
    seen: list[Request] = field(default_factory=list)
    url: str = ""
    port: int = 0
    sent: int = 0  # body bytes a streaming answer managed to write


def send(h: BaseHTTPRequestHandler, status: int, body: Any = None, **headers: str) -> None:
    """One complete answer: ``body`` is JSON unless it is bytes."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    h.send_response(status)
    ctype = "text/html" if isinstance(body, bytes) else "application/json"
    for k, v in {"Content-Type": ctype, "Content-Length": str(len(raw)), **headers}.items():
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(raw)


@pytest.fixture
def hostile() -> Iterator[Callable[..., Hostile]]:
    servers: list[ThreadingHTTPServer] = []

    def start(respond: Callable[[Request, BaseHTTPRequestHandler], None]) -> Hostile:
        hs = Hostile(respond)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                req = Request(
                    self.command,
                    self.path,
                    self.headers.get("Authorization"),
                    self.headers.get("Host"),
                    self.rfile.read(n) if n else b"",
                )
                hs.seen.append(req)
                try:
                    hs.respond(req, self)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            do_GET = do_POST = do_PATCH = do_DELETE = _any

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        servers.append(server)
        threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
        hs.port = server.server_address[1]
        hs.url = f"http://127.0.0.1:{hs.port}/neurobank/"
        return hs

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def record(name: str, sha1: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "sha1": sha1,
        "dtype": DTYPE,
        "metadata": {},
        "locations": [],
        **extra,
    }


NOT_FOUND = {"detail": "Not found."}


# --- the deposit steps against a hostile registry ----------------------------------


@pytest.fixture
def http_env(tmp_path: Path) -> Iterator[Callable[[Hostile], Env]]:
    made: list[Env] = []

    def start(hs: Hostile) -> Env:
        registry = HttpRegistry(hs.url, ("rig", "rig-password"), timeout=(2.0, 5.0))
        archive = opening.create_archive(tmp_path / "arch", registry.url)
        env = env_on(tmp_path, registry, archive, ARCHIVE, DTYPE)
        made.append(env)
        return env

    yield start
    for env in made:
        env.journal.close()
        env.registry.close()


def through_register(env: Env, item: Item) -> Item:
    """Runs the item's steps up to and including its first registration attempt (or a
    final state), as the daemon would, and returns it as journaled then."""
    for _ in range(20):
        if item.state in FINAL:
            return item
        step = next_step(item.progress, float("inf"))
        assert step is not None, item
        item = env.step(item, step)
        if step is Step.REGISTER:
            return item
    raise AssertionError(f"never registered: {item.state}")


def onwards(env: Env, item: Item, steps: int = 12) -> Item:
    """A few more steps (retries included), stopping at a final state."""
    for _ in range(steps):
        if item.state in FINAL:
            break
        step = next_step(item.progress, float("inf"))
        if step is None:
            break
        item = env.step(item, step)
    return item


def test_a_2xx_naming_another_record_is_not_taken_as_registered(
    hostile: Callable[..., Hostile], http_env: Callable[[Hostile], Env]
) -> None:
    """A 201 to POST resources/ whose record is another name and SHA-1 (a proxy's cached
    answer, a broken server) does not count as our record: nothing is published."""
    foreign = record("someone-else", "0" * 40, locations=["elsewhere"])

    def respond(req: Request, h: BaseHTTPRequestHandler) -> None:
        if req.method == "POST" and req.path == "/neurobank/resources/":
            send(h, 201, foreign)
        elif req.method == "GET" and req.path.startswith("/neurobank/resources/?"):
            send(h, 200, [])
        else:
            send(h, 404, NOT_FOUND)  # nothing named rec is ever registered

    hs = hostile(respond)
    env = http_env(hs)
    item = onwards(env, through_register(env, env.drop("rec.bin", b"the only recording")))
    assert item.state is not State.DONE and env.stored() == [], (item.state, env.stored())
    assert not item.progress.registered, item
    # the input is still somewhere the lab can find it
    assert (env.inbox / ".nbank" / item.token).exists() or (env.inbox / "rec.bin").exists()


def test_name_taken_is_not_read_as_ours_through_a_redirect_to_another_record(
    hostile: Callable[..., Hostile], http_env: Callable[[Hostile], Env]
) -> None:
    """After 'name taken', the record read back must be the one named: a GET
    resources/rec/ redirected to resources/twin/ (which holds our bytes) is not
    'rec is ours'; rec (someone else's bytes) never gets our archive as a location."""
    data = b"our recording, also registered as twin"
    ours = hashlib.sha1(data).hexdigest()

    def respond(req: Request, h: BaseHTTPRequestHandler) -> None:
        if req.method == "POST" and req.path == "/neurobank/resources/":
            send(h, 400, {"name": ["a resource with this name already exists"]})
        elif req.method == "GET" and req.path == "/neurobank/resources/rec/":
            send(h, 302, b"", Location="/neurobank/resources/twin/")
        elif req.method == "GET" and req.path == "/neurobank/resources/twin/":
            send(h, 200, record("twin", ours, locations=["elsewhere"]))
        elif req.method == "GET" and req.path.startswith("/neurobank/resources/?"):
            send(h, 200, [record("twin", ours)])
        elif req.method == "POST" and req.path.endswith("/locations/"):
            send(
                h,
                201,
                {
                    "archive_name": ARCHIVE,
                    "scheme": "neurobank",
                    "root": "/x",
                    "resource_name": "rec",
                    "key": None,
                },
            )
        else:
            send(h, 404, NOT_FOUND)

    hs = hostile(respond)
    env = http_env(hs)
    item = onwards(env, through_register(env, env.drop("rec.bin", data)))
    located = [r.path for r in hs.seen if r.method == "POST" and r.path.endswith("/locations/")]
    assert item.state is not State.DONE and env.stored() == [], (item.state, env.stored())
    assert located == [], "our archive was added as a location of someone else's record"


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, b"<!doctype html><title>Bad Request (400)</title><h1>Bad Request (400)</h1>"),
        (404, b"<html><body><h1>404 Not Found</h1>nginx</body></html>"),
        (405, b"<html><body><h1>405 Not Allowed</h1>nginx</body></html>"),
        (407, b"<html><body><h1>407 Proxy Authentication Required</h1></body></html>"),
    ],
    ids=["django-disallowed-host-400", "proxy-404", "proxy-405", "proxy-407"],
)
def test_a_proxy_refusing_the_registration_makes_the_input_wait_not_rejected(
    hostile: Callable[..., Hostile],
    http_env: Callable[[Hostile], Env],
    status: int,
    body: bytes,
) -> None:
    """A non-JSON 400 (Django's DisallowedHost page) or a proxy's own 404/405/407 to
    POST resources/ (misrouted location, read-only maintenance, expired proxy login) is
    a site problem the operator fixes: the input waits (SPEC 6), it is not rejected."""
    hs = hostile(lambda req, h: send(h, status, body))
    env = http_env(hs)
    item = through_register(env, env.drop("rec.bin", b"a fine recording"))
    assert item.state not in (State.REJECTING, State.REJECTED), (
        item.state,
        item.error_code,
        item.error_message,
    )


@pytest.mark.parametrize(
    "malformed",
    [{"name": "rec", "sha1": 12345, "dtype": DTYPE}, {"name": "rec"}, ["rec"]],
    ids=["sha1-a-number", "no-dtype", "a-list"],
)
def test_a_malformed_record_makes_the_input_wait_not_crash_or_judge(
    hostile: Callable[..., Hostile], http_env: Callable[[Hostile], Env], malformed: Any
) -> None:
    """Records of the wrong shape answered to the registration and to the look-up of
    the name are a transient registry error: the input waits, unpublished."""

    def respond(req: Request, h: BaseHTTPRequestHandler) -> None:
        if req.method == "POST" and req.path == "/neurobank/resources/":
            send(h, 201, malformed)
        elif req.method == "GET" and req.path == "/neurobank/resources/rec/":
            send(h, 200, malformed)
        elif req.method == "GET" and req.path.startswith("/neurobank/resources/?"):
            send(h, 200, [malformed])
        else:
            send(h, 404, NOT_FOUND)

    hs = hostile(respond)
    env = http_env(hs)
    item = onwards(env, through_register(env, env.drop("rec.bin", b"a fine recording")))
    assert item.state not in (State.DONE, State.REJECTING, State.REJECTED), item.state
    assert env.stored() == [] and not item.progress.registered, item
    assert item.error_code == errors.RegistryUnavailable.code, item.error_message


def test_a_malformed_record_is_registry_unavailable_naming_the_registry(
    hostile: Callable[..., Hostile],
) -> None:
    """A location of the wrong shape (no scheme, root, resource name) raises
    RegistryUnavailable naming the registry and the field, not KeyError."""
    hs = hostile(lambda req, h: send(h, 200, [{"archive_name": ARCHIVE}]))
    with HttpRegistry(hs.url) as reg, pytest.raises(errors.RegistryUnavailable) as err:
        reg.get_locations("rec")
    assert hs.url in str(err.value) and "'scheme'" in str(err.value), err.value


# --- the transport: loops, time and memory ---------------------------------------


@pytest.mark.parametrize("cycle", [1, 2], ids=["self-link", "two-page-cycle"])
def test_a_link_rel_next_loop_ends_with_an_error(
    hostile: Callable[..., Hostile], cycle: int
) -> None:
    """Pagination whose rel="next" leads back to a page already read stops with an
    error after a handful of requests, instead of looping (and growing) forever."""

    def respond(req: Request, h: BaseHTTPRequestHandler) -> None:
        if len(hs.seen) > 40:  # the test's own brake: the client never stops by itself
            send(h, 503, {"detail": "enough"})
            return
        page = 2 if "page=2" in req.path else 1
        nxt = page if cycle == 1 else 3 - page  # itself, or 1 -> 2 -> 1
        link = f'<{hs.url}resources/?page={nxt}>; rel="next"'
        send(h, 200, [record(f"r{page}")], Link=link)

    hs = hostile(respond)
    with HttpRegistry(hs.url) as reg, pytest.raises(errors.RegistryError):
        list(reg.search(dtype=DTYPE))
    assert len(hs.seen) <= 4, f"{len(hs.seen)} requests for a {cycle}-page cycle"


def test_a_last_link_that_lies_costs_a_page_or_two_not_its_count(
    hostile: Callable[..., Hostile],
) -> None:
    """An audit's concurrent listing told a billion pages by ``rel="last"`` stops at the
    first page that is empty, with a few requests in flight, and lists what exists."""

    def respond(req: Request, h: BaseHTTPRequestHandler) -> None:
        if "page=" not in req.path or "page=1" in req.path:
            last = f'<{hs.url}resources/?page=1000000000>; rel="last"'
            send(h, 200, [record("r1")], Link=last + f', <{hs.url}resources/?page=2>; rel="next"')
        elif "page=2" in req.path:
            send(h, 200, [record("r2")])
        else:
            send(h, 404, {"detail": "Invalid page."})

    hs = hostile(respond)
    with HttpRegistry(hs.url) as reg:
        names = [r.name for r in reg.search_pages(workers=4)]
    assert names == ["r1", "r2"]
    assert len(hs.seen) <= 2 + 2 * 4 + 1, f"{len(hs.seen)} requests"


def test_a_record_answered_as_null_is_no_answer(hostile: Callable[..., Hostile]) -> None:
    """A 200 whose body is ``null`` is not "no such record" (that is a 404): it is an
    outage, so that an input is never judged on it."""
    hs = hostile(lambda req, h: send(h, 200, None))
    with HttpRegistry(hs.url) as reg, pytest.raises(errors.RegistryUnavailable):
        reg.get_resource("rec")


def test_a_bulk_answer_keeps_only_the_names_asked_for(hostile: Callable[..., Hostile]) -> None:
    """Records a bulk endpoint answers for names nobody asked about are left out."""
    lines = b"\n".join(json.dumps(record(n)).encode() for n in ("asked", "other"))
    hs = hostile(lambda req, h: send(h, 200, lines, **{"Content-Type": "application/json"}))
    with HttpRegistry(hs.url) as reg:
        assert [r.name for r in reg.get_resources(["asked"])] == ["asked"]


def test_a_trickling_answer_hits_a_total_deadline(hostile: Callable[..., Hostile]) -> None:
    """A server (or proxy) sending one byte every 50 ms never trips the per-read
    timeout; the request still fails within a bounded total time (here, with
    timeouts of 0.5 s, within 8 s), instead of holding a deposit worker forever."""
    stop = threading.Event()

    def respond(req: Request, h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(10**6))
        h.end_headers()
        h.wfile.write(b'{"name": "rec", "pad": "')
        h.wfile.flush()
        give_up = time.monotonic() + 30.0
        while time.monotonic() < give_up and not stop.is_set():
            h.wfile.write(b"a")
            h.wfile.flush()
            hs.sent += 1
            stop.wait(0.05)  # the trickle itself, not a synchronisation

    hs = hostile(respond)
    outcome: list[BaseException | object] = []

    def ask() -> None:
        with HttpRegistry(hs.url, timeout=(0.5, 0.5)) as reg:
            try:
                outcome.append(reg.get_resource("rec"))
            except BaseException as err:  # reported below
                outcome.append(err)

    started = time.monotonic()
    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    asker.join(timeout=20.0)  # the client gives up after 2 s; the fault reads for 30
    elapsed = time.monotonic() - started
    stop.set()
    asker.join(timeout=10.0)
    assert elapsed < 20.0, f"still reading after {elapsed:.1f} s ({hs.sent} bytes trickled)"
    assert outcome and isinstance(outcome[0], errors.RegistryUnavailable), outcome


def test_an_endless_answer_is_not_read_into_memory_whole(hostile: Callable[..., Hostile]) -> None:
    """An answer far larger than any record (here a chunked body the server would send
    for ever; it stops at 96 MiB) is refused after a bounded read (at most 32 MiB),
    not buffered whole into the daemon's memory."""
    limit = 96 * 2**20
    chunk = b"a" * 2**20

    def respond(req: Request, h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

        def put(data: bytes) -> None:
            h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

        put(b'{"name": "rec", "sha1": null, "dtype": "d", "pad": "')
        while hs.sent < limit:
            put(chunk)
            hs.sent += len(chunk)
        put(b'"}')
        h.wfile.write(b"0\r\n\r\n")

    hs = hostile(respond)
    with HttpRegistry(hs.url, timeout=(2.0, 5.0)) as reg, contextlib.suppress(errors.RegistryError):
        reg.get_resource("rec")
    assert hs.sent <= 48 * 2**20, f"the client read {hs.sent >> 20} MiB of one record"


# --- guards: what held up ------------------------------------------------------------


def test_guard_redirected_authenticated_read_drops_credentials_off_host(
    hostile: Callable[..., Hostile],
) -> None:
    """Guard: on a site whose reads need credentials, a read redirected to another
    host (or port) does not carry the Authorization header there."""
    other = hostile(lambda req, h: send(h, 200, record("rec")))

    def respond(req: Request, h: BaseHTTPRequestHandler) -> None:
        if req.authorization is None:
            send(h, 403, {"detail": "Authentication credentials were not provided."})
        else:
            send(h, 302, b"", Location=f"http://localhost:{other.port}/neurobank/resources/rec/")

    hs = hostile(respond)
    with HttpRegistry(hs.url, ("rig", "S3CRET-pw")) as reg:
        reg.get_resource("rec")
    assert other.seen and all(r.authorization is None for r in other.seen)


def test_guard_write_is_never_redirected(hostile: Callable[..., Hostile]) -> None:
    """Guard: a write answered by a redirect is an error naming it, never followed (the
    credentials and the record stay with the registry URL)."""
    other = hostile(lambda req, h: send(h, 201, record("rec")))
    hs = hostile(
        lambda req, h: send(
            h, 307, b"", Location=f"http://localhost:{other.port}/neurobank/resources/"
        )
    )
    with HttpRegistry(hs.url, ("rig", "S3CRET-pw")) as reg, pytest.raises(errors.RegistryError):
        reg.add_resource(dtype=DTYPE, archive=ARCHIVE, name="rec", sha1="1" * 40)
    assert other.seen == []


def test_guard_an_empty_201_then_name_taken_ends_registered_once(
    hostile: Callable[..., Hostile], http_env: Callable[[Hostile], Env]
) -> None:
    """Guard: a 201 with an empty body (the record was made, the answer mangled) waits;
    the retry's 'name taken' finds our own record and the deposit completes, once."""
    data = b"registered, answer lost"
    ours = hashlib.sha1(data).hexdigest()
    made: list[dict[str, Any]] = []

    def respond(req: Request, h: BaseHTTPRequestHandler) -> None:
        if req.method == "POST" and req.path == "/neurobank/resources/":
            if made:
                send(h, 400, {"name": ["a resource with this name already exists"]})
            else:
                body = json.loads(req.body)
                made.append(record(body["name"], body["sha1"], locations=body["locations"]))
                send(h, 201, b"")
        elif req.method == "GET" and made and req.path.endswith(f"/{made[0]['name']}/"):
            send(h, 200, made[0])
        else:
            send(h, 404, NOT_FOUND)

    hs = hostile(respond)
    env = http_env(hs)
    item = through_register(env, env.drop("rec.bin", data))
    assert not item.progress.registered and item.state is not State.REJECTING
    item = onwards(env, item)
    assert item.state is State.DONE, (item.state, item.error_code, item.error_message)
    assert len(made) == 1 and made[0]["sha1"] == ours
    assert env.stored() == ["re/rec.bin"]

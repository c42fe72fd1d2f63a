"""HttpRegistry and the environment: proxies and NO_PROXY, read once when it opens."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nbankd.registry.http import HttpRegistry

RECORD = {"name": "r1", "sha1": None, "dtype": "d", "locations": [], "metadata": {}}


@pytest.fixture
def listener() -> Iterator[tuple[str, list[str]]]:
    """A loopback HTTP server answering every GET with one resource record; yields its
    address (host:port) and the request targets it saw, as sent."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            body = json.dumps(RECORD).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def no_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


def test_requests_go_through_the_proxy_the_environment_names(
    listener: tuple[str, list[str]], no_proxy_settings: pytest.MonkeyPatch
) -> None:
    """With HTTP_PROXY set, the registry is asked through that proxy (the absolute URL
    in the request line), without resolving the registry's own host name."""
    address, seen = listener
    no_proxy_settings.setenv("HTTP_PROXY", f"http://{address}")
    with HttpRegistry("http://registry.invalid/neurobank/", None) as reg:
        assert reg.get_resource("r1") is not None
        assert reg.get_resource("r1") is not None
    assert seen == ["http://registry.invalid/neurobank/resources/r1/"] * 2


def test_a_registry_named_in_no_proxy_is_asked_directly(
    listener: tuple[str, list[str]], no_proxy_settings: pytest.MonkeyPatch
) -> None:
    """A registry host listed in NO_PROXY is asked directly, not through HTTP_PROXY
    (here a port where nothing listens)."""
    address, seen = listener
    no_proxy_settings.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    no_proxy_settings.setenv("NO_PROXY", "127.0.0.1")
    with HttpRegistry(f"http://{address}/neurobank/", None) as reg:
        assert reg.get_resource("r1") is not None
    assert seen == ["/neurobank/resources/r1/"]

"""The client's CPU per registration POST, by HTTP client (#16).

    .venv/bin/python bench/http_client.py                 # 2,000 POSTs per client
    .venv/bin/python bench/http_client.py --requests 200

Against django-neurobank, nbankd's CPU per deposited file is about twice the
embedded registry's (bench/README.md): the difference is the registration's HTTP
request and the smaller rounds its answers start. This measures the first part
alone, in one process, against a local server (another process) that answers every
POST at once with a fixed 201 and a resource record: the process CPU time per POST
of the same JSON body, with credentials, on one keep-alive connection, through

- ``http.client``: the standard library's connection, the least a Python client
  can do (the floor);
- ``requests``: a ``requests.Session`` with ``trust_env`` off, as nbankd configures
  its own (``settle_environment``);
- ``nbankd``: nbankd's own transport (:class:`HttpTransport.request`, a write: the
  same session plus its answer's bounded read and checks).

It prints one line per client: CPU and wall microseconds per request (the wall
time includes the server's answer, which shares the machine).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import http.server
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests

from nbankd.registry.http_transport import HttpTransport

BODY = {
    "name": "rec0001",
    "sha1": "a" * 40,
    "dtype": "acoustic-recording",
    "metadata": {"experimenter": "bench"},
    "locations": [],
}
ANSWER = json.dumps({**BODY, "locations": ["http://127.0.0.1/archives/a/"]}).encode()


class _Answer(http.server.BaseHTTPRequestHandler):
    """Answers every POST with 201 and :data:`ANSWER`, in one write (no Nagle wait)."""

    protocol_version = "HTTP/1.1"
    wbufsize = 1 << 16  # headers and body leave together, flushed per request

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(ANSWER)))
        self.end_headers()
        self.wfile.write(ANSWER)

    def log_message(self, format: str, *args: object) -> None:
        pass


def serve(port_file: str) -> None:
    """The server process: binds a free loopback port, writes it to ``port_file``."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    Path(port_file).write_text(str(server.server_address[1]))
    server.serve_forever()


def _timed(n: int, one: Callable[[], None]) -> tuple[float, float]:
    """(CPU, wall) microseconds per call of ``one`` over ``n`` calls, after a warm-up."""
    for _ in range(min(50, n)):
        one()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(n):
        one()
    return (
        (time.process_time() - cpu) / n * 1e6,
        (time.perf_counter() - wall) / n * 1e6,
    )


def measure(port: int, n: int) -> dict[str, tuple[float, float]]:
    url = f"http://127.0.0.1:{port}/resources/"
    auth = "Basic " + base64.b64encode(b"bench:secret").decode()

    conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def plain() -> None:
        body = json.dumps(BODY).encode()
        headers = {"Content-Type": "application/json", "Authorization": auth}
        conn.request("POST", "/resources/", body, headers)
        json.loads(conn.getresponse().read())

    session = requests.Session()
    session.trust_env = False

    def with_requests() -> None:
        session.post(url, json=BODY, auth=("bench", "secret"), timeout=10).json()

    transport = HttpTransport(url, ("bench", "secret"), timeout=(10, 10))

    def with_nbankd() -> None:
        transport.request("POST", url, json_body=BODY, write=True).json()

    out = {
        "http.client": _timed(n, plain),
        "requests": _timed(n, with_requests),
        "nbankd": _timed(n, with_nbankd),
    }
    conn.close()
    session.close()
    transport.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="POSTs per client")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # the server process
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        port_file = Path(scratch) / "port"
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(port_file)])
        try:
            deadline = time.monotonic() + 30
            while not port_file.exists() or not port_file.read_text():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the answering server did not start")
                time.sleep(0.01)
            results = measure(int(port_file.read_text()), args.requests)
        finally:
            server.kill()
            server.wait()
    floor = results["http.client"][0]
    print(f"{args.requests} POSTs per client, one keep-alive connection each")
    print(f"{'client':<12} {'cpu_us':>8} {'wall_us':>8} {'cpu / http.client':>18}")
    for name, (cpu, wall) in results.items():
        print(f"{name:<12} {cpu:8.0f} {wall:8.0f} {cpu / floor:17.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Registry faults: the real daemon deposits through a proxy that breaks the registry.

The daemon talks to the real django-neurobank server through
:class:`~fixtures.fault_proxy.FaultProxy`. Each test drops a batch, turns a fault
on (500 answers, reset connections, answers held past the client's read timeout,
answers dropped after the server committed the write), checks that ``nbankctl
status`` reports the outage while it lasts and that no input moved, then turns
the fault off and checks that the backlog drains by itself: every input exactly
once in the archive and in the registry (asked directly, not through the proxy),
no SHA-1 registered twice, nothing rejected, every source gone.

Figures (faults injected per kind, inputs, losses) go to
``tests/reliability/results/registry_faults.json`` for RELIABILITY.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from fixtures.daemon import DaemonHarness, wait_for, work_entries
from fixtures.django_server import DjangoServer, unique_name
from fixtures.fault_proxy import FaultProxy

NBANKCTL = str(Path(sys.executable).with_name("nbankctl"))
RESULTS = Path(__file__).parent / "results" / "registry_faults.json"
# django-neurobank's read timeout in nbankd.registry.http.DEFAULT_TIMEOUT is 30 s
# (not configurable): the delay fault holds answers a little longer than that
CLIENT_READ_TIMEOUT = 30.0
AUTO_ID_RE = re.compile(r"^[0-9a-z]{8}$")

_figures: list[dict[str, Any]] = []


@pytest.fixture(scope="module", autouse=True)
def _write_figures() -> Iterator[None]:
    """Writes the figures of the tests that ran, for RELIABILITY.md to quote."""
    yield
    if not _figures:
        return
    totals: dict[str, int] = {}
    for fig in _figures:
        for kind, n in fig["faults_injected"].items():
            totals[kind] = totals.get(kind, 0) + n
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "suite": "registry faults (fault-injecting proxy before django-neurobank 0.12)",
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "faults_injected": totals,
                "inputs": sum(f["inputs"] for f in _figures),
                "losses": sum(f["losses"] for f in _figures),
                "registered_twice": sum(f["registered_twice"] for f in _figures),
                "rejected": sum(f["rejected"] for f in _figures),
                "cases": _figures,
            },
            indent=2,
        )
        + "\n"
    )


# --- helpers -------------------------------------------------------------------------


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def harness_via_proxy(
    daemon_factory: Any, server: DjangoServer, proxy: FaultProxy, **inbox_options: Any
) -> DaemonHarness:
    """A daemon whose registry URL is the proxy; its datatype made on the server directly."""
    h: DaemonHarness = daemon_factory(
        registry=proxy.url, auth=server.auth, inbox_options=inbox_options
    )
    h.dtype = server.add_datatype(content_type="application/octet-stream")
    return h


def status(h: DaemonHarness) -> tuple[int, dict[str, Any]]:
    """``nbankctl status --json``: (exit status, the status document)."""
    out = subprocess.run(
        [NBANKCTL, "-c", str(h.config_path), "--json", "status"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode in (0, 1), f"nbankctl status failed: {out.returncode} {out.stderr}"
    return out.returncode, json.loads(out.stdout)


def wait_outage_shown(h: DaemonHarness, timeout: float = 60.0) -> dict[str, Any]:
    """Waits until status reports the registry problem (exit 1); returns the document."""

    def shown() -> dict[str, Any] | None:
        code, doc = status(h)
        problem = doc["registry"]["problem"]
        return doc if code == 1 and problem else None

    try:
        return wait_for(shown, timeout, "status to report the registry outage")
    except AssertionError:
        h.dump_log()
        raise


def wait_healthy(h: DaemonHarness, timeout: float = 30.0) -> dict[str, Any]:
    def healthy() -> dict[str, Any] | None:
        code, doc = status(h)
        return doc if code == 0 and doc["registry"]["problem"] is None else None

    return wait_for(healthy, timeout, "status to be healthy again")


def drop_batch(h: DaemonHarness, n: int, prefix: str) -> dict[str, bytes]:
    """Drops ``n`` files with unique names (unique on the shared server) and sizes."""
    stem = unique_name(prefix, 24)
    payloads = {f"{stem}_{i}.dat": os.urandom(1000 + 7919 * i) for i in range(n)}
    payloads[f"{stem}_big.dat"] = os.urandom(3 << 20)
    for name, data in payloads.items():
        h.drop(name, data)
    return payloads


def inputs_intact(h: DaemonHarness, payloads: dict[str, bytes]) -> None:
    """Every input's bytes are still in its inbox (as dropped, or claimed in ``.nbank/``)."""
    present: set[str] = set()
    for folder in (h.inbox, h.inbox / ".nbank"):
        for p in folder.iterdir() if folder.is_dir() else ():
            if p.is_file():
                present.add(sha1(p.read_bytes()))
    missing = [name for name, data in payloads.items() if sha1(data) not in present]
    assert missing == [], f"inputs not intact in the inbox during the outage: {missing}"


def server_search(server: DjangoServer, **params: str) -> list[dict[str, Any]]:
    """Records from the django server itself (not through the proxy), all pages."""
    out: list[dict[str, Any]] = []
    url: str | None = server.url + "resources/"
    query: dict[str, str] | None = params
    while url:
        r = requests.get(url, params=query, timeout=30)
        r.raise_for_status()
        out += r.json()
        url, query = r.links.get("next", {}).get("url"), None
    return out


def check_exactly_once(
    h: DaemonHarness, server: DjangoServer, payloads: dict[str, bytes], *, auto_id: bool = False
) -> dict[str, int]:
    """Asserts every input is once in archive and registry, nothing else; returns counts."""
    receipts = h.receipts()
    assert h.reasons() == [], f"inputs were rejected: {h.reasons()}"
    by_sha = {r["sha1"]: r for r in receipts}
    assert len(receipts) == len(payloads) == len(by_sha), "a receipt missing or written twice"
    files = h.archive_files()
    twice = 0
    for name, data in payloads.items():
        receipt = by_sha[sha1(data)]
        rid = receipt["id"]
        if auto_id:
            assert AUTO_ID_RE.match(rid), rid
        else:
            assert rid == Path(name).stem
        records = server_search(server, sha1=sha1(data))
        twice += max(0, len(records) - 1)
        assert [r["name"] for r in records] == [rid], f"{name}: registered as {records}"
        assert records[0]["locations"] == [h.archive_name]
        stored = files[f"{rid}.dat"]
        assert stored.read_bytes() == data, f"{name}: archived bytes differ"
        assert not (h.inbox / name).exists(), f"{name}: source still in the inbox"
    in_archive = server_search(server, archive=h.archive_name)
    assert sorted(r["name"] for r in in_archive) == sorted(r["id"] for r in receipts)
    assert sorted(files) == sorted(f"{r['id']}.dat" for r in receipts)
    assert work_entries(h.inbox / ".nbank") == [], "work folder not empty"
    assert list((h.archive / "staging").iterdir()) == [], "staging/ not empty"
    return {"inputs": len(payloads), "losses": 0, "registered_twice": twice, "rejected": 0}


# scope of each fault: drop-after-commit only makes sense for writes
FAULTS: dict[str, dict[str, Any]] = {
    "error500": {},
    "reset": {},
    "drop_after_commit": {"methods": {"POST"}},
}
# what status says about each (the client's own words for the failure)
SHOWN_AS = {
    "error500": "answered 500",
    "reset": "Connection reset by peer",
    "drop_after_commit": "closed connection without response",
}


@pytest.mark.parametrize(
    ("kind", "auto_id"),
    [
        ("error500", False),
        ("reset", False),
        ("drop_after_commit", False),
        ("drop_after_commit", True),
    ],
)
def test_registry_fault_waits_then_backlog_drains_exactly_once(
    daemon_factory: Any,
    django_registry: DjangoServer,
    fault_proxy: FaultProxy,
    kind: str,
    auto_id: bool,
) -> None:
    """During a registry fault status shows it and inputs stay; afterwards each lands once."""
    h = harness_via_proxy(daemon_factory, django_registry, fault_proxy, auto_id=auto_id)
    h.start()
    fault_proxy.inject(kind, **FAULTS[kind])
    started = time.monotonic()
    payloads = drop_batch(h, 4, kind[:4])
    n = len(payloads)
    if kind == "drop_after_commit":
        # every input's POST reached the server and its answer was lost
        wait_for(lambda: fault_proxy.committed_dropped >= n, 60, "a committed POST per input")
    wait_for(lambda: fault_proxy.count(kind) >= 2 * n, 60, "two faults per input")
    doc = wait_outage_shown(h)
    assert SHOWN_AS[kind] in doc["registry"]["problem"], doc["registry"]
    assert any(d.startswith("registry:") for d in doc["degraded"]), doc["degraded"]
    assert h.receipts() == [] and h.reasons() == []
    inputs_intact(h, payloads)
    if kind == "drop_after_commit":
        # the server holds exactly one record per input already, and nothing else
        for data in payloads.values():
            assert len(server_search(django_registry, sha1=sha1(data))) == 1
    outage = time.monotonic() - started
    fault_proxy.clear()
    cleared = time.monotonic()
    h.wait_settled(n, timeout=90)
    drain = time.monotonic() - cleared
    wait_healthy(h)
    h.stop()
    counts = check_exactly_once(h, django_registry, payloads, auto_id=auto_id)
    if kind == "drop_after_commit":
        # each retry was told "already exists" and recognised the record as its own
        told_taken = [s for s in fault_proxy.requests("POST") if s.fault is None]
        assert len([s for s in told_taken if s.upstream_status == 400]) >= n, told_taken
    _figures.append(
        {
            "case": f"{kind}{' auto_id' if auto_id else ''}",
            "faults_injected": {kind: fault_proxy.count(kind)},
            "committed_then_dropped": fault_proxy.committed_dropped,
            "outage_s": round(outage, 1),
            "drain_s": round(drain, 1),
            **counts,
        }
    )


def test_answers_delayed_past_the_client_timeout(
    daemon_factory: Any, django_registry: DjangoServer, fault_proxy: FaultProxy
) -> None:
    """Registry answers held past the 30 s read timeout: items wait, then drain once."""
    h = harness_via_proxy(daemon_factory, django_registry, fault_proxy)
    h.start()
    fault_proxy.inject("delay", delay=CLIENT_READ_TIMEOUT + 5)
    started = time.monotonic()
    payloads = drop_batch(h, 3, "dly")
    n = len(payloads)
    doc = wait_outage_shown(h, timeout=CLIENT_READ_TIMEOUT + 30)
    assert "timed out" in doc["registry"]["problem"], doc["registry"]
    assert h.receipts() == [] and h.reasons() == []
    inputs_intact(h, payloads)
    outage = time.monotonic() - started
    fault_proxy.clear()
    cleared = time.monotonic()
    h.wait_settled(n, timeout=90)
    drain = time.monotonic() - cleared
    wait_healthy(h)
    h.stop()
    counts = check_exactly_once(h, django_registry, payloads)
    _figures.append(
        {
            "case": "delay",
            "faults_injected": {"delay": fault_proxy.count("delay")},
            "outage_s": round(outage, 1),
            "drain_s": round(drain, 1),
            **counts,
        }
    )


def test_registry_down_when_the_daemon_starts(
    daemon_factory: Any, django_registry: DjangoServer, fault_proxy: FaultProxy
) -> None:
    """A daemon (re)started while the registry answers 500 reports it, waits, then drains."""
    h = harness_via_proxy(daemon_factory, django_registry, fault_proxy)
    h.start()  # first start registers the archive
    h.stop()
    fault_proxy.inject("error500", status=503)
    payloads = drop_batch(h, 3, "boot")
    n = len(payloads)
    h.start()
    doc = wait_outage_shown(h)
    assert "503" in doc["registry"]["problem"], doc["registry"]
    wait_for(lambda: fault_proxy.count("error500") >= 2 * n, 60, "two faults per input")
    assert h.receipts() == [] and h.reasons() == []
    inputs_intact(h, payloads)
    fault_proxy.clear()
    h.wait_settled(n, timeout=90)
    wait_healthy(h)
    h.stop()
    counts = check_exactly_once(h, django_registry, payloads)
    _figures.append(
        {
            "case": "error503 at start-up",
            "faults_injected": {"error500": fault_proxy.count("error500")},
            **counts,
        }
    )


def test_first_start_while_the_registry_is_down(
    daemon_factory: Any, django_registry: DjangoServer, fault_proxy: FaultProxy
) -> None:
    """A new daemon (archive still to create and register) started in an outage drains after it."""
    h = harness_via_proxy(daemon_factory, django_registry, fault_proxy)
    fault_proxy.inject("error500")
    payloads = drop_batch(h, 2, "first")
    n = len(payloads)
    h.start()
    wait_outage_shown(h)
    inputs_intact(h, payloads)
    fault_proxy.clear()
    wait_for(lambda: len(h.receipts()) + len(h.reasons()) >= n, 30, "the backlog to drain")
    wait_healthy(h)
    h.stop()
    counts = check_exactly_once(h, django_registry, payloads)
    _figures.append(
        {
            "case": "error500 at first start",
            "faults_injected": {"error500": fault_proxy.count("error500")},
            **counts,
        }
    )

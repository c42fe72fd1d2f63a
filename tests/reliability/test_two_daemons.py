"""Two daemons, one inbox, one archive, one django-neurobank registry (guarantee 3).

Both ``nbankd`` processes (distinct state folders and control sockets, the same inbox
and archive configuration) start at the same moment on an inbox already holding a
few hundred files. Claiming is a rename, so exactly one of them can take each file;
the test checks that each input ends exactly once in archive and registry, that
both daemons did part of the work, and that nothing was rejected or logged as a
warning or an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
from pathlib import Path
from typing import Any

from fixtures.daemon import DaemonHarness, wait_for, work_entries
from nbankd.archive.opening import create_archive
from nbankd.names import CANARY_NAME
from nbankd.registry.http import HttpRegistry
from reliability import figures

FILES = 200


def _problem_lines(h: DaemonHarness) -> list[str]:
    """Log lines at warning level or above, with tracebacks, or not JSON at all."""
    out = []
    for line in h.log_path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            out.append(line)  # not a log event: a traceback or a crash message
            continue
        if event.get("level") not in ("debug", "info") or "exception" in event:
            out.append(line)
    return out


def _start_together(daemons: list[DaemonHarness]) -> None:
    """Starts every daemon at once and waits until each has sent READY=1."""
    failures: list[BaseException] = []

    def start(h: DaemonHarness) -> None:
        try:
            h.start(timeout=60)
        except BaseException as err:
            failures.append(err)

    threads = [threading.Thread(target=start, args=(h,)) for h in daemons]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_two_daemons_share_one_inbox_and_each_input_ends_once(
    tmp_path: Path, django_registry: Any
) -> None:
    """Both daemons claim files from a pre-filled inbox; every input is deposited exactly once."""
    server = django_registry
    auth = (server.username, server.password)
    dtype = server.add_datatype()
    shared: dict[str, Any] = {"registry": server.url, "auth": auth, "dtype": dtype}
    a = DaemonHarness(root=tmp_path / "a", **shared)
    b = DaemonHarness(root=tmp_path / "b", archive_name=a.archive_name, **shared)
    for h in (a, b):
        h.root.mkdir()
        h.archive_options = {"create": False}
    b.inbox, b.archive, b.rejected = a.inbox, a.archive, a.rejected  # shared
    create_archive(a.archive, server.url)
    server.add_archive(str(a.archive), name=a.archive_name)

    prefix = "two" + uuid.uuid4().hex[:8]
    inputs: dict[str, bytes] = {}  # sha1 -> bytes
    names: dict[str, str] = {}  # sha1 -> identifier
    for i in range(FILES):
        data = os.urandom(1000 + 97 * i)
        name = f"{prefix}_{i:03d}"
        a.drop(f"{name}.wav", data)
        sha1 = hashlib.sha1(data).hexdigest()
        inputs[sha1], names[sha1] = data, name

    try:
        _start_together([a, b])
        wait_for(
            lambda: len(a.receipts()) + len(b.receipts()) >= FILES or a.reasons(),
            240,
            f"{FILES} deposits by the two daemons",
        )
        a.stop()
        b.stop()
    except BaseException:
        a.dump_log()
        b.dump_log()
        raise

    # each daemon claimed some, and the receipts together name every input once
    got_a, got_b = a.receipts(), b.receipts()
    assert got_a and got_b, f"one daemon did everything: {len(got_a)} + {len(got_b)}"
    receipts = got_a + got_b
    assert sorted(r["sha1"] for r in receipts) == sorted(inputs)
    assert sorted(r["id"] for r in receipts) == sorted(names.values())
    assert all(r["id"] == names[r["sha1"]] for r in receipts)

    # the archive holds each input once, with its bytes; nothing is left behind
    stored = a.archive_files()
    assert sorted(stored) == sorted(f"{n}.wav" for n in names.values())
    for sha1, name in names.items():
        assert stored[f"{name}.wav"].read_bytes() == inputs[sha1]
    assert list((a.archive / "staging").iterdir()) == []
    assert sorted(p.name for p in a.inbox.iterdir()) == [".nbank", CANARY_NAME, "rejected"]
    assert work_entries(a.inbox / ".nbank") == []
    assert a.reasons() == [] and list(a.rejected.iterdir()) == []

    # the registry has one record per input, located in this archive
    with HttpRegistry(server.url) as registry:
        records = list(registry.search(archive=a.archive_name))
    assert sorted((r.name, r.sha1) for r in records) == sorted((n, s) for s, n in names.items())
    assert all(r.locations == (a.archive_name,) for r in records)

    assert _problem_lines(a) == [] and _problem_lines(b) == []
    figures.record(
        "two_daemons",
        "django-shared-inbox",
        {
            "inputs": FILES,
            "deposited": len(receipts),
            "rejected": 0,
            "claimed_by_first": len(got_a),
            "claimed_by_second": len(got_b),
            "duplicates": len(records) - len({r.sha1 for r in records}),
            "losses": FILES - len({r["sha1"] for r in receipts}),
        },
    )

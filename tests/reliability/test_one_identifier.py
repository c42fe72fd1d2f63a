"""Two inputs for one identifier, through the running daemon (hostile round D).

Pairs of inputs that share an identifier and bytes under two extensions are claimed
in one burst and move through their steps together in the lane's rounds, so both of
a pair are looked up before either registers or publishes. Whatever the interleaving, each
identifier ends with one record and one stored file, and the other input of the
pair is rejected ``duplicate`` naming that file. The same files dropped again are
idempotent successes (receipts marked ``already-deposited``). Every interleaving is
also driven step by step in ``tests/deposit/test_steps_identifiers.py``.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from typing import Any

from fixtures.daemon import DaemonHarness

from .figures import record

PAIRS = 20


def test_pairs_with_one_identifier_end_with_one_file_each(daemon_factory: Any) -> None:
    """Twenty (p.wav, p.bin) pairs with equal bytes in one burst: one record and one
    stored file per identifier, the other input rejected duplicate naming it, bytes
    kept; dropped again, each is already deposited with nothing new stored."""
    started = time.monotonic()
    h: DaemonHarness = daemon_factory()
    data = {f"pair{i:02d}": os.urandom(3000 + i) for i in range(PAIRS)}
    for name, blob in data.items():
        h.drop(f"{name}.wav", blob)
        h.drop(f"{name}.bin", blob)
    h.start()
    h.wait_settled(2 * PAIRS)
    files = h.archive_files()
    per_identifier = Counter(name.split(".")[0] for name in files)
    assert per_identifier.keys() == data.keys() and set(per_identifier.values()) == {1}, files
    reasons = {r["original_path"]: r for r in h.reasons()}
    assert len(reasons) == PAIRS
    with h.open_registry() as reg:
        for name, blob in data.items():
            [stored] = [p for f, p in files.items() if f.startswith(name + ".")]
            assert stored.read_bytes() == blob and stored.parent.name == name[:2]
            record_ = reg.get_resource(name)
            assert record_ is not None and record_.sha1 == hashlib.sha1(blob).hexdigest()
            other = name + (".bin" if stored.name.endswith(".wav") else ".wav")
            reason = next(r for p, r in reasons.items() if p.endswith(other))
            assert reason["code"] == "duplicate" and str(stored) in reason["message"]
    kept = {p.name: p.read_bytes() for p in h.rejected.rglob("*") if p.suffix != ".reason"}
    assert all(blob == data[n.split(".")[0]] for n, blob in kept.items()) and len(kept) == PAIRS
    for name in data:  # the same files again, under the names that were deposited
        stored_name = next(f for f in files if f.startswith(name + "."))
        h.drop(stored_name, data[name])
    h.wait_settled(3 * PAIRS)
    h.stop()
    outcomes = Counter(r["outcome"] for r in h.receipts())
    assert outcomes == {"deposited": PAIRS, "already-deposited": PAIRS}
    assert h.archive_files().keys() == files.keys()
    assert not [p for p in h.inbox.glob("pair*")]
    record(
        "one-identifier",
        "burst-pairs-then-redrop",
        {
            "inputs": 3 * PAIRS,
            "deposited": PAIRS,
            "already_deposited": PAIRS,
            "rejected": PAIRS,
            "losses": 0,
            "duplicates": 0,
            "seconds": round(time.monotonic() - started, 1),
        },
    )

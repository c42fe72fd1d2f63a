"""The reliability invariants, checked from the outside after a daemon has settled.

Given a :class:`~fixtures.daemon.DaemonHarness` and the inputs a test dropped,
:func:`check` asserts guarantee 1 and 3 of the spec from what is on disk and in
the registry, never from what the daemon says about itself:

- every input ends exactly once: deposited (one receipt, the archived bytes equal
  the input's, a registry record with its SHA-1 and this archive as a location) or
  rejected (one ``NAME.reason``, the bytes in the rejected folder equal the
  input's), and is no longer in its inbox;
- the SHA-1 of every archived resource matches its registry record, and every
  archived resource has a receipt; no registry record of this archive lacks its
  file; no two receipts share a token or an identifier;
- nothing is left over: ``staging/`` and every ``<inbox>/.nbank/`` are empty, no
  stray sidecar or marker is left in an inbox, every file in a rejected folder
  belongs to a reason, and the journal has no item in flight.

:func:`snapshot` captures everything the daemon may change (archive, registry,
receipts, inboxes, rejected folders, journal) so a test can assert that a further
recovery changed nothing. Other reliability tests import both.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fixtures.daemon import work_entries
from nbankd.archive import opening
from nbankd.deposit.lifecycle import FINAL
from nbankd.hashing import DirectoryHasher, hash_path
from nbankd.names import CANARY_NAME

WORK_DIR = ".nbank"
JOURNAL = "journal.sqlite3"


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def tree_sha1(tree: Mapping[str, bytes]) -> str:
    """neurobank's directory hash of a folder holding ``tree`` (relative path -> bytes)."""
    hasher = DirectoryHasher()
    from pathlib import PurePosixPath

    for rel in sorted(tree):
        hasher.add(PurePosixPath(rel), sha1(tree[rel]))
    return hasher.hexdigest()


@dataclass(frozen=True)
class Input:
    """One input a test dropped: a file (``data``) or a folder resource (``tree``).

    ``expect`` is "deposited", "rejected" or None (either is fine, e.g. for one of
    two copies of the same content); ``codes`` the acceptable rejection codes.
    ``sidecar`` holds the bytes of a ``NAME.nbank.yaml`` dropped with it and
    ``marker`` says a ``NAME.done`` was dropped with it.
    """

    inbox: Path
    relpath: str
    data: bytes | None = None
    tree: Mapping[str, bytes] | None = None
    expect: str | None = None
    codes: tuple[str, ...] = ()
    sidecar: bytes | None = None
    marker: bool = False

    @property
    def sha1(self) -> str:
        if self.tree is not None:
            return tree_sha1(self.tree)
        assert self.data is not None
        return sha1(self.data)

    @property
    def key(self) -> tuple[str, str]:
        return (os.path.realpath(self.inbox), self.relpath)

    def write(self, scratch: Path | None = None) -> None:
        """Creates the input (and its sidecar, then marker) the way a rig would: rename in."""
        scratch = scratch or self.inbox.parent
        dest = self.inbox / self.relpath
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = scratch / f".drop-{hashlib.sha1(self.relpath.encode()).hexdigest()[:12]}"
        if self.tree is not None:
            for rel, data in self.tree.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(data)
        else:
            assert self.data is not None
            tmp.write_bytes(self.data)
        if self.sidecar is not None:
            side_tmp = tmp.with_name(tmp.name + ".side")
            side_tmp.write_bytes(self.sidecar)
            os.rename(side_tmp, dest.with_name(dest.name + ".nbank.yaml"))
        os.rename(tmp, dest)
        if self.marker:
            dest.with_name(dest.name + ".done").touch()


@dataclass
class Counts:
    """What :func:`check` found, for reports and RELIABILITY.md figures."""

    inputs: int = 0
    deposited: int = 0
    rejected: int = 0
    records: int = 0
    archived: int = 0
    codes: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "deposited": self.deposited,
            "rejected": self.rejected,
            "records": self.records,
            "archived": self.archived,
            "rejection_codes": dict(sorted(self.codes.items())),
        }


def read_receipts(state_dir: Path) -> list[dict[str, Any]]:
    """Every receipt line under ``state_dir/receipts``; a torn line fails the check."""
    out: list[dict[str, Any]] = []
    folder = state_dir / "receipts"
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*.jsonl")):
        for n, line in enumerate(path.read_bytes().split(b"\n"), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError as err:
                    raise AssertionError(f"{path}:{n}: torn receipt line {line[:80]!r}") from err
    return out


def read_reasons(rejected_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    if not rejected_dir.is_dir():
        return []
    return [(p, json.loads(p.read_bytes())) for p in sorted(rejected_dir.rglob("*.reason"))]


def _content_matches(path: Path, inp: Input) -> bool:
    if inp.tree is not None:
        if not path.is_dir():
            return False
        found = {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}
        return found == dict(inp.tree)
    return path.is_file() and not path.is_symlink() and path.read_bytes() == inp.data


def journal_in_flight(state_dir: Path) -> list[tuple[str, str, bytes]]:
    """(token, state, relpath) of every journal item that is not final."""
    path = state_dir / JOURNAL
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        finals = tuple(str(s) for s in FINAL)
        marks = ", ".join("?" for _ in finals)
        rows = db.execute(
            f"SELECT token, state, relpath FROM items WHERE state NOT IN ({marks})", finals
        ).fetchall()
    finally:
        db.close()
    return [(r[0], r[1], bytes(r[2])) for r in rows]


def _registry_records(h: Any) -> dict[str, Any]:
    with h.open_registry() as reg:
        return {r.name: r for r in reg.search(archive=h.archive_name)}


def check(
    h: Any,
    inputs: Sequence[Input],
    *,
    inboxes: Iterable[Path] | None = None,
    rejected_name: str = "rejected",
) -> Counts:
    """Asserts every reliability invariant for harness ``h`` after it settled; returns counts.

    ``inboxes`` defaults to the harness's one inbox; each has its rejected folder
    ``<inbox>/<rejected_name>``. The archive and its registry records must belong
    to this harness alone (every test uses a fresh archive name).
    """
    inbox_list = [Path(p) for p in (inboxes if inboxes is not None else [h.inbox])]
    problems: list[str] = []
    receipts = read_receipts(h.state_dir)
    tokens = Counter(r["token"] for r in receipts)
    ids = Counter(r["id"] for r in receipts)
    problems += [f"receipt written {n} times for token {t}" for t, n in tokens.items() if n > 1]
    problems += [f"{n} receipts for identifier {i}" for i, n in ids.items() if n > 1]
    by_source: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in receipts:
        inbox_real = os.path.realpath(r["inbox"])
        rel = os.path.relpath(os.path.realpath(r["source"]), inbox_real)
        by_source.setdefault((inbox_real, rel), []).append(r)
    reasons: dict[tuple[str, str], list[tuple[Path, dict[str, Any]]]] = {}
    rejected_files: set[Path] = set()
    for inbox in inbox_list:
        inbox_real = os.path.realpath(inbox)
        for path, reason in read_reasons(inbox / rejected_name):
            rel = os.path.relpath(os.path.realpath(reason["original_path"]), inbox_real)
            reasons.setdefault((inbox_real, rel), []).append((path, reason))
            rejected_files.add(path)
    records = _registry_records(h)
    counts = Counts(inputs=len(inputs), records=len(records))
    expected_keys = {inp.key for inp in inputs}
    for key in set(by_source) - expected_keys:
        problems.append(f"receipt for an input the test never dropped: {key}")
    for key in set(reasons) - expected_keys:
        problems.append(f"reason for an input the test never dropped: {key}")

    with h.open_registry() as reg:
        for inp in inputs:
            got = by_source.get(inp.key, [])
            rej = reasons.get(inp.key, [])
            where = f"input {inp.relpath!r} in {inp.inbox}"
            if len(got) + len(rej) != 1:
                problems.append(
                    f"{where}: {len(got)} receipt(s) and {len(rej)} rejection(s), expected one"
                )
                continue
            if os.path.lexists(inp.inbox / inp.relpath):
                problems.append(f"{where}: still in the inbox after it was finished")
            if got:
                counts.deposited += 1
                problems += _check_deposited(h, reg, inp, got[0], records, where)
            else:
                counts.rejected += 1
                path, reason = rej[0]
                code = str(reason.get("code", "?"))
                counts.codes[code] = counts.codes.get(code, 0) + 1
                problems += _check_rejected(inp, path, reason, rejected_files, where)
            for sidecar_name in (inp.relpath + ".nbank.yaml", inp.relpath + ".done"):
                if os.path.lexists(inp.inbox / sidecar_name):
                    problems.append(f"{where}: {sidecar_name} left in the inbox")

    problems += _check_contents(inputs, by_source)
    problems += _check_archive(h, receipts, records, counts)
    problems += _check_leftovers(h, inbox_list, rejected_name, rejected_files)
    in_flight = journal_in_flight(h.state_dir)
    if in_flight:
        problems.append(f"journal items still in flight: {in_flight}")
    if problems:
        raise AssertionError("reliability invariants violated:\n  " + "\n  ".join(problems))
    return counts


def _check_contents(
    inputs: Sequence[Input], by_source: Mapping[tuple[str, str], list[dict[str, Any]]]
) -> list[str]:
    """Each content is archived at most once, and once unless a copy must be rejected."""
    groups: dict[str, list[Input]] = {}
    for inp in inputs:
        if inp.tree is not None or inp.data:
            groups.setdefault(inp.sha1, []).append(inp)
    out: list[str] = []
    for digest, group in groups.items():
        deposited = [i.relpath for i in group if by_source.get(i.key)]
        if len(deposited) > 1:
            out.append(f"content {digest} archived {len(deposited)} times: {deposited}")
        elif not deposited and all(i.expect != "rejected" for i in group):
            out.append(f"content {digest} never archived: {[i.relpath for i in group]}")
    return out


def _check_deposited(
    h: Any,
    reg: Any,
    inp: Input,
    receipt: dict[str, Any],
    records: Mapping[str, Any],
    where: str,
) -> list[str]:
    out: list[str] = []
    if inp.expect == "rejected":
        out.append(f"{where}: deposited as {receipt['id']}, expected a rejection")
    if receipt["sha1"] != inp.sha1:
        out.append(f"{where}: receipt sha1 {receipt['sha1']} != input {inp.sha1}")
    stored = Path(receipt["archive_path"])
    if not os.path.lexists(stored):
        out.append(f"{where}: archived copy {stored} is missing")
    elif not _content_matches(stored, inp):
        out.append(f"{where}: archived copy {stored} differs from the input's bytes")
    record = records.get(receipt["id"]) or reg.get_resource(receipt["id"])
    if record is None:
        out.append(f"{where}: no registry record {receipt['id']}")
    else:
        if (record.sha1 or "").lower() != inp.sha1:
            out.append(f"{where}: record {record.name} sha1 {record.sha1} != {inp.sha1}")
        if h.archive_name not in record.locations:
            out.append(f"{where}: record {record.name} lacks location {h.archive_name}")
    return out


def _check_rejected(
    inp: Input, reason_path: Path, reason: dict[str, Any], rejected_files: set[Path], where: str
) -> list[str]:
    out: list[str] = []
    if inp.expect == "deposited":
        out.append(f"{where}: rejected ({reason.get('code')}: {reason.get('message')})")
    if inp.codes and reason.get("code") not in inp.codes:
        out.append(f"{where}: rejection code {reason.get('code')!r} not in {inp.codes}")
    for key in ("code", "message", "time", "original_path", "rejected_path"):
        if key not in reason:
            out.append(f"{where}: {reason_path} lacks {key!r}")
    moved = Path(reason.get("rejected_path", ""))
    rejected_files.add(moved)
    if not os.path.lexists(moved):
        out.append(f"{where}: rejected copy {moved} is missing")
    elif not _content_matches(moved, inp):
        out.append(f"{where}: rejected copy {moved} differs from the input's bytes")
    if inp.sidecar is not None:
        side = moved.with_name(moved.name + ".nbank.yaml")
        rejected_files.add(side)
        if not side.is_file() or side.read_bytes() != inp.sidecar:
            out.append(f"{where}: its sidecar is not next to the rejected copy ({side})")
    if inp.marker:
        rejected_files.add(moved.with_name(moved.name + ".done"))
    return out


def _check_archive(
    h: Any, receipts: list[dict[str, Any]], records: Mapping[str, Any], counts: Counts
) -> list[str]:
    out: list[str] = []
    archive = opening.open_archive(h.archive)
    anomalies: list[Any] = []
    receipt_ids = {r["id"] for r in receipts}
    for name, path in archive.iter_resources(anomalies):
        counts.archived += 1
        if name not in receipt_ids:
            out.append(f"archived resource {path} has no receipt")
        record = records.get(name)
        if record is None:
            out.append(f"archived resource {path} has no registry record")
        elif (record.sha1 or "").lower() != hash_path(path):
            out.append(f"archived resource {path} does not match its record's sha1")
    out += [f"archive anomaly: {a}" for a in anomalies]
    for name in records:
        if archive.stored_path(name) is None:
            out.append(f"registry record {name} has no file in {h.archive}")
    return out


def _check_leftovers(
    h: Any, inboxes: Sequence[Path], rejected_name: str, rejected_files: set[Path]
) -> list[str]:
    out: list[str] = []
    staging = h.archive / "staging"
    if staging.is_dir() and os.listdir(staging):
        out.append(f"leftovers in {staging}: {sorted(os.listdir(staging))}")
    for inbox in inboxes:
        work = inbox / WORK_DIR
        left = sorted(p.name for p in work_entries(work)) if work.is_dir() else []
        if left:
            out.append(f"leftovers in {work}: {left}")
        ours = (WORK_DIR, rejected_name, CANARY_NAME)
        stray = sorted(n for n in os.listdir(inbox) if n not in ours)
        if stray:
            out.append(f"left in inbox {inbox}: {stray}")
        rejected = inbox / rejected_name
        if rejected.is_dir():
            for p in rejected.rglob("*"):
                if p.is_dir() and any(p == f or p in f.parents for f in rejected_files):
                    continue
                if p.suffix == ".reason" or p in rejected_files:
                    continue
                if any(parent in rejected_files for parent in p.parents):
                    continue  # inside a rejected folder resource
                out.append(f"{p} in the rejected folder belongs to no reason")
    return out


# -- snapshots -------------------------------------------------------------------------


def _listing(root: Path) -> dict[str, tuple[int, str]]:
    """{relative path: (mode, sha1 or '<dir>')} of everything under root (links not followed)."""
    out: dict[str, tuple[int, str]] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = os.lstat(p)
            kind = "<dir>" if p.is_dir() and not p.is_symlink() else sha1(p.read_bytes())
            out[str(p.relative_to(root))] = (st.st_mode, kind)
    return out


def _journal_rows(state_dir: Path) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(f"file:{state_dir / JOURNAL}?mode=ro", uri=True, timeout=30)
    try:
        return db.execute(
            "SELECT id, token, state, relpath, name, sha1, url, rejected_relpath, reason_json,"
            " finished FROM items ORDER BY id"
        ).fetchall()
    finally:
        db.close()


def snapshot(h: Any, inboxes: Iterable[Path] | None = None) -> dict[str, Any]:
    """Everything a recovery could change, in comparable form."""
    inbox_list = [Path(p) for p in (inboxes if inboxes is not None else [h.inbox])]
    records = _registry_records(h)
    receipts_dir = h.state_dir / "receipts"
    return {
        "archive": _listing(h.archive / "resources"),
        "staging": _listing(h.archive / "staging"),
        "registry": sorted(
            (r.name, r.sha1, r.dtype, tuple(sorted(r.locations)), json.dumps(r.metadata))
            for r in records.values()
        ),
        "receipts": {p.name: p.read_bytes() for p in sorted(receipts_dir.glob("*.jsonl"))},
        "inboxes": {str(i): _listing(i) for i in inbox_list},
        "journal": _journal_rows(h.state_dir),
    }


def assert_same(before: Mapping[str, Any], after: Mapping[str, Any]) -> None:
    """Fails naming each part of a snapshot that changed."""
    changed = [k for k in before if before[k] != after.get(k)]
    if changed:
        detail = []
        for k in changed:
            if isinstance(before[k], dict) and isinstance(after.get(k), dict):
                b, a = before[k], after[k]
                diff = {n for n in set(b) | set(a) if b.get(n) != a.get(n)}
                detail.append(f"{k}: {sorted(map(str, diff))[:20]}")
            else:
                detail.append(k)
        raise AssertionError("a second recovery changed: " + "; ".join(detail))

"""Export files: a full registry round-trips; truncated or malformed files are refused."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from nbankd import errors
from nbankd.migration import snapshot
from nbankd.registry.embedded import EmbeddedRegistry


@pytest.fixture
def filled(tmp_path: Path) -> EmbeddedRegistry:
    """An embedded registry with every kind of record (tape key, no-sha1 resource, metadata)."""
    reg = EmbeddedRegistry(tmp_path / "src.sqlite3", url="https://old.example/neurobank/")
    reg.add_datatype("wav", "audio/wav", "wav")
    reg.add_archive("arch", "neurobank", "/data/arch")
    reg.add_archive("tape1-0", "tape", "tape1:0", "offline")
    reg.add_resource(dtype="wav", archive="arch", name="r1", sha1="a" * 40, metadata={"rig": 3})
    reg.add_resource(
        dtype="wav", archive="arch", name="r2", sha1="b" * 40, metadata={"experimenter": "ann"}
    )
    reg.add_resource(dtype="wav", archive=None, name="nosha")
    reg.add_location("r1", "tape1-0", key="resources/r1/r1.wav")
    return reg


def test_export_round_trips_every_record(filled: EmbeddedRegistry, tmp_path: Path) -> None:
    """take -> save -> load gives the same datatypes, archives, resources and locations."""
    snap = snapshot.take(filled)
    path = tmp_path / "export.jsonl"
    snapshot.save(snap, path)
    again = snapshot.load(path)
    assert again == snap
    assert snap.counts() == {"datatype": 1, "archive": 2, "resource": 3, "location": 3}
    assert [r.name for r in snap.resources] == ["r1", "r2", "nosha"]  # oldest first
    assert all(r.created_on and r.created_by for r in snap.resources)
    tape = [x for x in snap.locations if x.archive_name == "tape1-0"]
    assert [(x.resource_name, x.key) for x in tape] == [("r1", "resources/r1/r1.wav")]
    assert snap.resources[1].experimenter == "ann"
    assert snap.source == "https://old.example/neurobank/"
    assert not list(tmp_path.glob(".*tmp"))


def _text(filled: EmbeddedRegistry) -> list[str]:
    out = io.StringIO()
    snapshot.write(snapshot.take(filled), out)
    return out.getvalue().splitlines()


def test_a_truncated_export_is_refused(filled: EmbeddedRegistry) -> None:
    """Without its end line the file is incomplete, and nothing is imported from it."""
    lines = _text(filled)[:-1]
    with pytest.raises(errors.UsageError, match="incomplete"):
        snapshot.read(lines, "x.jsonl")


def _edit(lines: list[str], kind: str, **changes: object) -> list[str]:
    out = []
    done = False
    for line in lines:
        body = json.loads(line)
        if body["type"] == kind and not done:
            body.update(changes)
            done = True
        out.append(json.dumps(body))
    return out


# the export of `filled`: header (line 1), datatype (2), archives (3-4), resources (5-7),
# locations (8-10), end (11)
BAD = [
    ("not json", lambda ls: [ls[0], "{oops", *ls[1:]], "not JSON", 2),
    ("no header", lambda ls: ls[1:], "no 'nbankd-registry-export' header", 1),
    ("newer version", lambda ls: _edit(ls, "header", version=99), "newer than this nbankd", 1),
    ("bad sha1", lambda ls: _edit(ls, "resource", sha1="xyz"), "is not a SHA-1", 5),
    ("bad name", lambda ls: _edit(ls, "resource", name="a b"), "not a valid registry name", 5),
    ("unknown type", lambda ls: _edit(ls, "datatype", type="gizmo"), "unknown line type", 2),
    ("count mismatch", lambda ls: [*ls[:-2], ls[-1]], "the 'end' line counts", 10),
    ("unknown archive", lambda ls: _edit(ls, "location", archive_name="nope"), "archive 'nope'", 8),
    ("archive twice", lambda ls: [*ls[:3], ls[2], *ls[3:]], "archive 'arch' appears twice", 4),
    ("located twice", lambda ls: [*ls[:8], ls[7], *ls[8:]], "located in 'arch' twice", 9),
    ("after end", lambda ls: [*ls, ls[1]], "after the 'end' line", 12),
]


@pytest.mark.parametrize(("edit", "message", "line"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_malformed_exports_name_the_line(
    filled: EmbeddedRegistry, edit: Callable[[list[str]], list[str]], message: str, line: int
) -> None:
    """Each malformed file is refused with the file, the line and what is wrong."""
    with pytest.raises(errors.UsageError, match=message) as info:
        snapshot.read(edit(_text(filled)), "x.jsonl")
    assert str(info.value).startswith(f"x.jsonl:{line}: "), str(info.value)


def test_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    """An unreadable export file names itself (exit 2)."""
    with pytest.raises(errors.UsageError, match="cannot read the export file") as info:
        snapshot.load(tmp_path / "nope.jsonl")
    assert errors.exit_code_for(info.value) == errors.EXIT_USAGE

"""Receipts (one JSON line per deposit) and the names of rejection reasons."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from nbankd.deposit.receipts import append_receipt, read_receipts, receipts_path

INBOX = "/srv/inbox/rig3"


def _receipt(token: str = "0" * 32, **extra: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "token": token,
        "source": f"{INBOX}/bird/rec1.wav",
        "inbox": INBOX,
        "id": "rec1",
        "url": "https://host/neurobank/resources/rec1/",
        "sha1": "a" * 40,
        "size": 1234,
        "dtype": "vocalization-wav",
        "archive": "birdsong",
        "archive_path": "/home/data/birdsong/resources/re/rec1.wav",
        "time": "2024-05-01T12:00:00+00:00",
    }
    r.update(extra)
    return r


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


# -- appending -----------------------------------------------------------------------


def test_append_writes_one_json_line_with_the_fields(tmp_path: Path) -> None:
    """A receipt is one newline-terminated JSON line holding exactly its fields."""
    path = append_receipt(tmp_path, INBOX, _receipt())
    data = path.read_bytes()
    assert data.endswith(b"\n")
    assert data.count(b"\n") == 1
    assert json.loads(data) == _receipt()


def test_append_returns_the_inbox_log(tmp_path: Path) -> None:
    """append_receipt writes to, and returns, receipts_path for the inbox."""
    assert append_receipt(tmp_path, INBOX, _receipt()) == receipts_path(tmp_path, INBOX)


def test_append_creates_the_receipts_folder(tmp_path: Path) -> None:
    """A missing receipts folder is created on the first append."""
    folder = tmp_path / "state" / "receipts"
    append_receipt(folder, INBOX, _receipt())
    assert folder.is_dir()


def test_append_same_token_twice_writes_one_line(tmp_path: Path) -> None:
    """Replaying the record step after a crash does not duplicate the receipt."""
    append_receipt(tmp_path, INBOX, _receipt("ab" * 16))
    path = append_receipt(tmp_path, INBOX, _receipt("ab" * 16, time="2024-05-01T12:00:09+00:00"))
    assert len(_lines(path)) == 1


def test_a_retried_append_writes_one_line_per_receipt(tmp_path: Path) -> None:
    """A retried record step (its log's cache dropped before the check) appends nothing
    for a receipt the log holds, and appends one it does not. That the drop exposes a
    line lost by a failed writeback needs a failing disk: not shown here."""
    append_receipt(tmp_path, INBOX, _receipt("ab" * 16))
    path = append_receipt(tmp_path, INBOX, _receipt("ab" * 16), retried=True)
    append_receipt(tmp_path, INBOX, _receipt("cd" * 16, id="rec2"), retried=True)
    assert [json.loads(line)["token"] for line in _lines(path)] == ["ab" * 16, "cd" * 16]


def test_append_different_tokens_keeps_order(tmp_path: Path) -> None:
    """Receipts of different deposits are all kept, in the order they were appended."""
    for n in range(3):
        path = append_receipt(tmp_path, INBOX, _receipt(f"{n:032x}", id=f"rec{n}"))
    assert [json.loads(line)["id"] for line in _lines(path)] == ["rec0", "rec1", "rec2"]


def test_append_token_prefix_of_another_is_not_a_duplicate(tmp_path: Path) -> None:
    """Only an identical token counts as already logged, not a token it starts with."""
    append_receipt(tmp_path, INBOX, _receipt("abcdef"))
    path = append_receipt(tmp_path, INBOX, _receipt("abcd"))
    assert len(_lines(path)) == 2


def test_append_keeps_non_utf8_source_paths(tmp_path: Path) -> None:
    """A source path with undecodable bytes is written and read back unchanged."""
    source = os.fsdecode(b"/srv/inbox/rig3/b\xffird/r\xe9c1.wav")
    append_receipt(tmp_path, INBOX, _receipt(source=source))
    assert [r["source"] for r in read_receipts(tmp_path)] == [source]


def test_receipts_log_mode_is_0640(tmp_path: Path) -> None:
    """The receipts log is not world-readable, even with a permissive umask."""
    old = os.umask(0)
    try:
        path = append_receipt(tmp_path / "r", INBOX, _receipt())
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def _torn(receipt: dict[str, Any], before_key: str) -> bytes:
    """The start of the receipt's line, as a crash mid-append could leave it."""
    line = json.dumps(receipt, sort_keys=True, ensure_ascii=False).encode()
    return line[: line.index(f'"{before_key}"'.encode())]


def test_append_after_a_torn_line_keeps_receipts_readable(tmp_path: Path) -> None:
    """After a crash left half a line, later receipts are still lines of their own."""
    path = append_receipt(tmp_path, INBOX, _receipt("01" * 16, id="first"))
    with open(path, "ab") as f:
        f.write(_torn(_receipt("02" * 16, id="torn"), "sha1"))
    append_receipt(tmp_path, INBOX, _receipt("03" * 16, id="third"))
    ids = [r["id"] for r in read_receipts(tmp_path)]
    assert ids[0] == "first"
    assert ids[-1] == "third"


def test_replay_rewrites_a_receipt_torn_after_its_token(tmp_path: Path) -> None:
    """A receipt cut short by a crash is written in full when the step is replayed."""
    torn = _receipt("02" * 16, id="torn")
    path = receipts_path(tmp_path, INBOX)
    tmp_path.mkdir(exist_ok=True)
    path.write_bytes(_torn(torn, "url"))
    append_receipt(tmp_path, INBOX, torn)
    assert torn in list(read_receipts(tmp_path))


# -- receipts_path -------------------------------------------------------------------


def test_receipts_path_is_stable(tmp_path: Path) -> None:
    """The same inbox always maps to the same log."""
    assert receipts_path(tmp_path, INBOX) == receipts_path(tmp_path, INBOX)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("/srv/inbox/rig3", "/srv/inbox/rig4"),
        ("/srv/a/b", "/srv/a-b"),
        ("/srv/inbox", "/srv/inbox/"),
        ("/x/" + "d" * 80 + "/rig3", "/y/" + "d" * 80 + "/rig3"),
        ("/srv/é", "/srv/è"),
    ],
)
def test_receipts_path_is_distinct_per_inbox(tmp_path: Path, a: str, b: str) -> None:
    """Different inbox keys get different logs, even when their readable slugs agree."""
    assert receipts_path(tmp_path, a) != receipts_path(tmp_path, b)


@pytest.mark.parametrize(
    "key", [INBOX, "/", "/" + "x" * 4000, os.fsdecode(b"/srv/\xff\xfe"), "/srv/../etc"]
)
def test_receipts_path_is_a_jsonl_file_in_the_folder(tmp_path: Path, key: str) -> None:
    """The log is a .jsonl file directly in the receipts folder, with a short name."""
    path = receipts_path(tmp_path, key)
    assert path.parent == tmp_path
    assert path.suffix == ".jsonl"
    assert len(os.fsencode(path.name)) <= 255
    assert not path.name.startswith(".")


def test_receipts_path_is_readable(tmp_path: Path) -> None:
    """The log's name shows the inbox path it belongs to."""
    assert receipts_path(tmp_path, INBOX).name.startswith("srv-inbox-rig3-")


# -- reading -------------------------------------------------------------------------


def test_read_receipts_returns_what_was_appended(tmp_path: Path) -> None:
    """read_receipts yields every appended receipt, across inboxes."""
    r1 = _receipt("01" * 16)
    r2 = _receipt("02" * 16, id="rec2")
    r3 = _receipt("03" * 16, inbox="/srv/inbox/rig4", id="rec3")
    append_receipt(tmp_path, INBOX, r1)
    append_receipt(tmp_path, INBOX, r2)
    append_receipt(tmp_path, "/srv/inbox/rig4", r3)
    got = list(read_receipts(tmp_path))
    assert sorted(got, key=lambda r: r["token"]) == [r1, r2, r3]
    assert [r for r in got if r["inbox"] == INBOX] == [r1, r2]


def test_read_receipts_of_missing_folder_is_empty(tmp_path: Path) -> None:
    """No receipts folder yet means no receipts, not an error."""
    assert list(read_receipts(tmp_path / "missing")) == []


# -- rejection reasons ---------------------------------------------------------------


def test_reason_name_keeps_short_names() -> None:
    """A name that fits gets '.reason' appended unchanged."""
    from nbankd.deposit.rejection import reason_name

    assert reason_name(b"rec1.wav") == b"rec1.wav.reason"


def test_reason_name_keeps_a_name_that_just_fits() -> None:
    """A 248-byte name plus '.reason' is exactly 255 bytes and is not shortened."""
    from nbankd.deposit.rejection import reason_name

    name = b"r" * 244 + b".wav"
    assert reason_name(name) == name + b".reason"
    assert len(reason_name(name)) == 255


@pytest.mark.parametrize("length", [249, 250, 255])
def test_reason_name_shortens_long_names(length: int) -> None:
    """A name too long for the suffix is shortened to at most 255 bytes ending in .reason."""
    from nbankd.deposit.rejection import reason_name

    name = b"r" * (length - 4) + b".wav"
    result = reason_name(name)
    assert len(result) <= 255
    assert result.endswith(b".reason")
    assert result.startswith(b"r" * 200)


def test_reason_name_distinct_for_long_names_sharing_a_prefix() -> None:
    """Two long names that differ only past the cut get different reason names."""
    from nbankd.deposit.rejection import reason_name

    prefix = b"r" * 250
    assert reason_name(prefix + b"1.wav") != reason_name(prefix + b"2.wav")


def test_reason_name_is_deterministic() -> None:
    """The same long name always gives the same reason name (so replays find it)."""
    from nbankd.deposit.rejection import reason_name

    name = b"q" * 255
    assert reason_name(name) == reason_name(bytes(name))


def test_reason_name_of_long_utf8_name_stays_utf8() -> None:
    """Shortening a UTF-8 name never cuts a character in half."""
    from nbankd.deposit.rejection import reason_name

    name = ("é" * 125 + ".wav").encode()  # 254 bytes
    result = reason_name(name)
    assert len(result) <= 255
    result.decode("utf-8")


# -- free names in the rejected folder -----------------------------------------------


def test_free_name_keeps_a_free_name(tmp_path: Path) -> None:
    """When nothing has the name yet, it is used as is."""
    from nbankd.deposit.rejection import _free_name

    assert _free_name(tmp_path, b"rec1.wav") == b"rec1.wav"


@pytest.mark.parametrize(
    ("taken", "basename", "expected"),
    [
        ([b"rec1.wav"], b"rec1.wav", b"rec1~1.wav"),
        ([b"rec1.wav", b"rec1~1.wav"], b"rec1.wav", b"rec1~2.wav"),
        ([b"rec1.wav.reason"], b"rec1.wav", b"rec1~1.wav"),
        ([b"rec1~1.wav.reason", b"rec1.wav"], b"rec1.wav", b"rec1~2.wav"),
        ([b"a.tar.gz"], b"a.tar.gz", b"a.tar~1.gz"),
        ([b".hidden"], b".hidden", b".hidden~1"),
        ([b"noext"], b"noext", b"noext~1"),
    ],
)
def test_free_name_avoids_taken_names(
    tmp_path: Path, taken: list[bytes], basename: bytes, expected: bytes
) -> None:
    """A taken name (or one whose .reason exists) gets the first free ~N before the extension."""
    from nbankd.deposit.rejection import _free_name

    for name in taken:
        (tmp_path / os.fsdecode(name)).write_bytes(b"")
    assert _free_name(tmp_path, basename) == expected


def test_free_name_of_long_taken_name_fits(tmp_path: Path) -> None:
    """A free name for a taken 255-byte name is at most 255 bytes and names nothing."""
    from nbankd.deposit.rejection import _free_name

    name = b"r" * 251 + b".wav"
    (tmp_path / os.fsdecode(name)).write_bytes(b"")
    result = _free_name(tmp_path, name)
    assert len(result) <= 255
    assert result != name
    assert not (tmp_path / os.fsdecode(result)).exists()

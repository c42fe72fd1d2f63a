"""nbankd.metadata_readers: nbank's reader plugins run in a limited child process, and
the rule merging given metadata with a file's.

The plugins are a real package built here: a module and a ``.dist-info`` folder whose
``entry_points.txt`` declares them in ``nbank.metadata_readers``, in a folder put on the
child's search path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures.readers import plugin_package
from nbankd.metadata_readers import (
    MetadataMismatch,
    find_reader,
    merge_metadata,
    read_file_metadata,
)

READERS = """
import os, time
from pathlib import Path

def wav(path):
    data = Path(path).read_bytes()
    if not data.startswith(b"RIFF"):
        raise ValueError("no RIFF header")
    return {"sampling_rate": 20000, "channels": 2, "bird": data[4:].decode() or None}

def named(path):
    return {"name": Path(path).name}

def hang(path):
    time.sleep(3600)

def hog(path):
    block = bytearray(8 << 30)
    return {"size": len(block)}

def crash(path):
    os.abort()

def lookup(path):
    return {}["missing"]

def listing(path):
    return ["not", "a", "dict"]

def unstorable(path):
    return {"when": object()}

def chatty(path):
    import sys
    line = "x" * 1023 + "\\n"
    for _ in range(32 * 1024):  # 32 MiB of progress messages
        sys.stderr.write(line)
    return {"ok": 1}

def huge(path):
    return {"blob": "x" * (5 << 20)}

def spewing(path):
    import sys
    if os.fork() == 0:  # left behind, writing on for ever
        while True:
            os.write(2, b"y" * 65536)
    return {"ok": 1}
"""

ENTRY_POINTS = """\
[nbank.metadata_readers]
wav-rec = labreaders:wav
named-rec = labreaders:named
hang-rec = labreaders:hang
hog-rec = labreaders:hog
crash-rec = labreaders:crash
lookup-rec = labreaders:lookup
list-rec = labreaders:listing
odd-rec = labreaders:unstorable
broken-rec = labreaders_missing_module:read
chatty-rec = labreaders:chatty
huge-rec = labreaders:huge
spew-rec = labreaders:spewing
"""


def reader_package(root: Path, name: str = "labreaders", entry_points: str = ENTRY_POINTS) -> Path:
    """Writes the package ``name`` (module labreaders.py and its dist-info) into ``root``;
    returns ``root``, the folder to put on the reader's search path."""
    return plugin_package(root, "labreaders", READERS, entry_points, dist=name)


@pytest.fixture
def path(tmp_path: Path) -> list[str]:
    return [*sys.path, str(reader_package(tmp_path / "plugins"))]


@pytest.fixture
def wav(tmp_path: Path) -> Path:
    f = tmp_path / "good.wav"
    f.write_bytes(b"RIFFzf12")
    return f


def test_a_reader_gives_the_files_metadata(path: list[str], wav: Path) -> None:
    """A valid file gives the reader's metadata."""
    result = read_file_metadata("wav-rec", wav, search_path=path)
    assert (result.status, dict(result.metadata)) == (
        "read",
        {"sampling_rate": 20000, "channels": 2, "bird": "zf12"},
    )


def test_keys_without_a_value_are_left_out(path: list[str], tmp_path: Path) -> None:
    """A key the reader gives as None is left out, as nbank leaves it out."""
    f = tmp_path / "b.wav"
    f.write_bytes(b"RIFF")
    assert "bird" not in read_file_metadata("wav-rec", f, search_path=path).metadata


def test_a_value_error_makes_the_file_invalid(path: list[str], tmp_path: Path) -> None:
    """A reader's ValueError is the file's verdict, with the reader's message."""
    f = tmp_path / "bad.wav"
    f.write_bytes(b"junk")
    result = read_file_metadata("wav-rec", f, search_path=path)
    assert result.status == "invalid"
    assert result.message == "the wav-rec reader rejects the file: no RIFF header"
    assert result.error() is not None and result.error().code == "invalid-file"


def test_no_reader_for_a_datatype(path: list[str], wav: Path) -> None:
    """A datatype no package reads gives no-reader."""
    assert read_file_metadata("plain-rec", wav, search_path=path).status == "no-reader"


def test_the_reader_sees_the_name_it_is_given(path: list[str], wav: Path) -> None:
    """The reader reads the file under the name given (a staged copy keeps the input's name)."""
    result = read_file_metadata("named-rec", wav, name="rec 1.wav", search_path=path)
    assert result.metadata == {"name": "rec 1.wav"}


def test_a_reader_that_hangs_is_stopped_at_the_time_limit(path: list[str], wav: Path) -> None:
    """A reader still running at the time limit is killed; the reader is unavailable."""
    t0 = time.monotonic()
    result = read_file_metadata("hang-rec", wav, timeout=2, search_path=path)
    assert time.monotonic() - t0 < 30
    assert result.status == "unavailable" and "did not finish within 2 s" in result.message


def test_a_reader_over_the_memory_limit_is_unavailable(path: list[str], wav: Path) -> None:
    """A reader allocating more than the memory limit is unavailable, not the file invalid."""
    result = read_file_metadata("hog-rec", wav, memory=1 << 30, search_path=path)
    assert result.status == "unavailable" and "more memory than allowed" in result.message


def test_a_reader_that_cannot_be_imported_is_unavailable(path: list[str], wav: Path) -> None:
    """A reader whose module cannot be imported is unavailable, naming the import error."""
    result = read_file_metadata("broken-rec", wav, search_path=path)
    assert result.status == "unavailable"
    assert "cannot be loaded: ModuleNotFoundError" in result.message
    assert "labreaders_missing_module" in result.message
    assert result.error() is not None and result.error().transient


def test_a_reader_that_crashes_the_process_is_unavailable(path: list[str], wav: Path) -> None:
    """A reader that kills its process (SIGABRT) is unavailable, naming the signal."""
    result = read_file_metadata("crash-rec", wav, search_path=path)
    assert result.status == "unavailable" and "killed by signal 6" in result.message


def test_a_reader_raising_another_error_is_unavailable(path: list[str], wav: Path) -> None:
    """A reader failing with an error other than ValueError is unavailable (its bug)."""
    result = read_file_metadata("lookup-rec", wav, search_path=path)
    assert result.status == "unavailable" and "KeyError" in result.message


def test_a_reader_returning_a_list_is_unavailable(path: list[str], wav: Path) -> None:
    """A reader returning something other than a dict is unavailable."""
    result = read_file_metadata("list-rec", wav, search_path=path)
    assert result.status == "unavailable" and "returned list, not a dict" in result.message


def test_a_value_that_cannot_be_registered_is_named(path: list[str], wav: Path) -> None:
    """A value that is not JSON makes the reader unavailable, naming its key."""
    result = read_file_metadata("odd-rec", wav, search_path=path)
    assert result.status == "unavailable" and "'when'" in result.message


def test_a_reader_writing_much_on_stderr_writes_nothing_to_disk(path: list[str], wav: Path) -> None:
    """A reader writing 32 MiB of messages is read, its messages kept in memory only by
    their end: under a 1 MiB file size limit (RLIMIT_FSIZE) nothing of them is a file."""
    code = (
        "import json, resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
        "from nbankd.metadata_readers import read_file_metadata\n"
        "r = read_file_metadata('chatty-rec', sys.argv[1], search_path=json.loads(sys.argv[2]))\n"
        "print(json.dumps([r.status, dict(r.metadata), r.message]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(wav), json.dumps(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert json.loads(done.stdout) == ["read", {"ok": 1}, ""], done.stderr


def test_an_answer_larger_than_any_record_takes_is_unavailable(path: list[str], wav: Path) -> None:
    """A reader answering with more than 4 MiB is unavailable, never held in memory whole."""
    result = read_file_metadata("huge-rec", wav, search_path=path)
    assert result.status == "unavailable" and "more than 4 MiB" in result.message


def test_guard_a_helper_writing_on_after_the_answer_ends_nothing(
    path: list[str], wav: Path
) -> None:
    """A reader leaving a process that writes on its error output for ever is read at
    once: what is read after the reader's exit is bounded."""
    result = read_file_metadata("spew-rec", wav, timeout=60, search_path=path)
    assert (result.status, dict(result.metadata)) == ("read", {"ok": 1})


def test_two_packages_reading_one_datatype_are_refused(tmp_path: Path, wav: Path) -> None:
    """Two packages with a reader for one datatype make it unavailable, naming both."""
    one = reader_package(tmp_path / "one", "labreaders")
    two = reader_package(
        tmp_path / "two", "otherreaders", "[nbank.metadata_readers]\nwav-rec = labreaders:named\n"
    )
    result = read_file_metadata("wav-rec", wav, search_path=[*sys.path, str(one), str(two)])
    assert result.status == "unavailable"
    assert "labreaders" in result.message and "otherreaders" in result.message


def test_find_reader_runs_no_plugin_code(tmp_path: Path) -> None:
    """Finding a reader names its package without importing the plugin's module."""
    where = reader_package(tmp_path / "plugins")
    (where / "labreaders.py").write_text("raise SystemExit('imported')\n")
    assert find_reader("wav-rec", [*sys.path, str(where)]) == "labreaders"


def test_a_link_is_not_followed(path: list[str], wav: Path, tmp_path: Path) -> None:
    """The file is opened without following a symbolic link."""
    link = tmp_path / "link.wav"
    link.symlink_to(wav)
    with pytest.raises(OSError):
        read_file_metadata("wav-rec", link, search_path=path)
    assert os.path.exists(wav)


# --- merging ------------------------------------------------------------------------


def test_read_merges_agreeing_metadata() -> None:
    """read: the file's keys and the given ones together when they agree."""
    merged = merge_metadata({"bird": "zf12", "rig": 3}, {"bird": "zf12", "rate": 20000}, "read")
    assert merged == {"bird": "zf12", "rig": 3, "rate": 20000}


def test_read_refuses_a_difference_naming_the_key() -> None:
    """read: a given value that differs from the file's is an error naming the key."""
    with pytest.raises(MetadataMismatch, match=r"bird is 'zf12' there but 'zf13' was given"):
        merge_metadata({"bird": "zf13"}, {"bird": "zf12"}, "read", source="'a.wav'")


def test_read_counts_a_boolean_and_a_number_as_different() -> None:
    """read: True given where the file says 1 is a difference (as nbank counts it)."""
    with pytest.raises(MetadataMismatch, match="flag"):
        merge_metadata({"flag": True}, {"flag": 1}, "read")


def test_override_lets_the_given_values_win() -> None:
    """override: where they differ, the given value is registered."""
    merged = merge_metadata({"bird": "zf13"}, {"bird": "zf12", "rate": 1}, "override")
    assert merged == {"bird": "zf13", "rate": 1}


def test_skip_keeps_only_the_given_metadata() -> None:
    """skip: the file's metadata is not used."""
    assert merge_metadata({"bird": "zf13"}, {"bird": "zf12", "rate": 1}, "skip") == {"bird": "zf13"}

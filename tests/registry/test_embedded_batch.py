"""The embedded registry's batches: many writes of one thread committed in one
transaction (what a round of small files registers with)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.registry_batches import committed, refuse_the_commit
from nbankd import errors
from nbankd.registry.embedded import EmbeddedRegistry

SHA_A, SHA_B, SHA_C = "a" * 40, "b" * 40, "c" * 40


@pytest.fixture
def reg(tmp_path: Path) -> Iterator[EmbeddedRegistry]:
    """An embedded registry with datatype 'wav' and archive a1."""
    with EmbeddedRegistry(tmp_path / "registry.sqlite3") as r:
        r.add_datatype("wav", "audio/wav", "wav")
        r.add_archive("a1", "neurobank", "/data/a1")
        yield r


def test_writes_of_a_batch_are_committed_together_at_its_end(reg: EmbeddedRegistry) -> None:
    """Inside a batch nothing is visible to others; at its end every write is."""
    with reg.batch():
        reg.add_resource(dtype="wav", archive="a1", name="one", sha1=SHA_A)
        reg.add_resource(dtype="wav", archive="a1", name="two", sha1=SHA_B)
        assert committed(reg) == set()
        assert reg.get_resource("one") is not None  # the batch's own thread sees them
    assert committed(reg) == {"one", "two"}


def test_a_refused_write_undoes_only_itself(reg: EmbeddedRegistry) -> None:
    """A name taken inside the batch is refused; the writes before and after stay."""
    with reg.batch():
        reg.add_resource(dtype="wav", archive="a1", name="one", sha1=SHA_A)
        with pytest.raises(errors.NameTaken):
            reg.add_resource(dtype="wav", archive="a1", name="one", sha1=SHA_B)
        reg.add_resource(dtype="wav", archive="a1", name="three", sha1=SHA_C)
    assert committed(reg) == {"one", "three"}
    record = reg.get_resource("one")
    assert record is not None and record.sha1 == SHA_A and record.locations == ("a1",)


def test_an_exception_inside_the_batch_keeps_none_of_it(reg: EmbeddedRegistry) -> None:
    """A batch left by an exception is rolled back."""
    with pytest.raises(RuntimeError), reg.batch():
        reg.add_resource(dtype="wav", archive="a1", name="one", sha1=SHA_A)
        raise RuntimeError("the caller's failure")
    assert committed(reg) == set()
    reg.add_resource(dtype="wav", archive="a1", name="after", sha1=SHA_B)  # not left locked
    assert committed(reg) == {"after"}


def test_a_refused_commit_raises_and_keeps_none_of_the_batch(reg: EmbeddedRegistry) -> None:
    """SQLite refusing the commit is the registry's error, and no write of it stands."""
    with pytest.raises(errors.RegistryError, match="FOREIGN KEY"), reg.batch():
        reg.add_resource(dtype="wav", archive="a1", name="one", sha1=SHA_A)
        refuse_the_commit(reg)
    assert committed(reg) == set()
    assert reg.get_resource("one") is None


def test_a_nested_batch_is_part_of_the_outer_one(reg: EmbeddedRegistry) -> None:
    """The inner batch's end commits nothing; the outer one's commits both."""
    with reg.batch():
        with reg.batch():
            reg.add_resource(dtype="wav", archive="a1", name="inner", sha1=SHA_A)
        assert committed(reg) == set()
        reg.add_resource(dtype="wav", archive="a1", name="outer", sha1=SHA_B)
    assert committed(reg) == {"inner", "outer"}


def test_a_batch_without_writes_holds_no_lock(reg: EmbeddedRegistry) -> None:
    """Reads inside a batch take no write lock: another writer goes on meanwhile."""
    with EmbeddedRegistry(reg.db_path, busy_timeout=0.5) as other, reg.batch():
        assert reg.get_resource("none") is None
        other.add_resource(dtype="wav", archive="a1", name="theirs", sha1=SHA_A)
    assert committed(reg) == {"theirs"}


def test_a_write_waiting_for_the_lock_fails_the_batchs_later_writes_at_once(
    reg: EmbeddedRegistry,
) -> None:
    """A write that waited the whole busy timeout for the lock fails, and so do the
    batch's later writes, without waiting again; the next batch tries again."""
    with EmbeddedRegistry(reg.db_path, busy_timeout=0.2) as other:
        holder = sqlite3.connect(reg.db_path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            with other.batch():
                with pytest.raises(errors.RegistryUnavailable):
                    other.add_resource(dtype="wav", archive="a1", name="first", sha1=SHA_A)
                holder.execute("ROLLBACK")
                with pytest.raises(errors.RegistryUnavailable, match="held its write lock"):
                    other.add_resource(dtype="wav", archive="a1", name="second", sha1=SHA_B)
            with other.batch():
                other.add_resource(dtype="wav", archive="a1", name="third", sha1=SHA_B)
        finally:
            holder.close()
    assert committed(reg) == {"third"}


def test_other_threads_are_not_part_of_a_batch(reg: EmbeddedRegistry) -> None:
    """A batch is its thread's: another thread's write inside it commits at once."""
    with reg.batch():
        thread = threading.Thread(
            target=reg.add_resource, kwargs={"dtype": "wav", "archive": None, "name": "theirs"}
        )
        thread.start()
        thread.join(timeout=30)
        assert committed(reg) == {"theirs"}
        reg.add_resource(dtype="wav", archive="a1", name="mine", sha1=SHA_A)
        assert committed(reg) == {"theirs"}
    assert committed(reg) == {"theirs", "mine"}


# A failing read inside the batch, as a full disk makes one: RLIMIT_FSIZE refuses the
# write of the dirty pages a small page cache has to spill while the read runs, and
# SQLite rolls the whole transaction back (a read-only statement's IOERR does that).
_READ_ROLLS_BACK = textwrap.dedent(
    """
    import json, resource, signal, sys
    from nbankd import errors
    from nbankd.registry.embedded import EmbeddedRegistry

    reg = EmbeddedRegistry(sys.argv[1])
    reg.add_datatype("wav", "audio/wav", "wav")
    reg.add_archive("a1", "neurobank", "/data/a1")
    for i in range(300):
        reg.add_resource(dtype="wav", archive="a1", name=f"pre{i:04d}", sha1=f"{i:040x}",
                         metadata={"k": "x" * 3000})
    conn = reg._conn()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA cache_size = 10")
    conn.execute("PRAGMA cache_spill = 10")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    out = {"read": "ok", "batch": "committed"}
    try:
        with reg.batch():
            reg.add_resource(dtype="wav", archive="a1", name="A", sha1="a" * 40)
            reg.add_resource(dtype="wav", archive="a1", name="B", sha1="b" * 40)
            resource.setrlimit(resource.RLIMIT_FSIZE, (16, resource.RLIM_INFINITY))
            try:
                list(reg.search(metadata__k="y"))
            except errors.RegistryError as err:
                out["read"] = f"failed: {err}"
            finally:
                resource.setrlimit(
                    resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
                )
            out["in_transaction"] = conn.in_transaction
    except errors.RegistryUnavailable as err:
        out["batch"] = f"raised: {err}"
    print(json.dumps(out))
    """
)


def test_a_batch_undone_by_a_failing_read_raises(tmp_path: Path) -> None:
    """SQLite rolling the batch back on a read (the disk full): its end raises, and
    neither write stands."""
    db = tmp_path / "registry.sqlite3"
    proc = subprocess.run(
        [sys.executable, "-c", _READ_ROLLS_BACK, str(db)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["read"].startswith("failed") and out["in_transaction"] is False, out
    assert out["batch"].startswith("raised") and "rolled the transaction back" in out["batch"]
    with EmbeddedRegistry(db) as reg:
        assert {"A", "B"} & committed(reg) == set()

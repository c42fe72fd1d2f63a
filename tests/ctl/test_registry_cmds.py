"""nbankctl's registry commands, run as a subprocess against both registry backends.

Every test that takes ``backend`` runs twice: against the embedded registry and
against the real django-neurobank server (fixtures in tests/fixtures/cli_backends.py).
Where the real ``nbank`` client can read the same registry, its answers are compared.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

from fixtures.cli_backends import NBANKCTL, Backend, base_env, json_stream, sha1, store
from nbankd.archive.access import apply_access
from nbankd.archive.layout import Archive
from nbankd.registry.embedded import EmbeddedRegistry
from nbankd.registry.http import HttpRegistry

# --- init ------------------------------------------------------------------------------


def test_init_registers_folder_name(backend: Backend) -> None:
    """init creates the archive layout and registers it under the folder's name."""
    folder = backend.tmp / backend.name("new")
    proc = backend.ctl("init", str(folder))
    assert proc.returncode == 0, proc.stderr
    assert (folder / "nbank.json").is_file() and (folder / "staging").is_dir()
    record = backend.registry.get_archive(folder.name)
    assert record is not None and record.root == str(folder) and record.scheme == "neurobank"
    assert json.loads((folder / "nbank.json").read_text())["registry"] == backend.registry.url


def test_init_with_name_option(backend: Backend) -> None:
    """init -n NAME registers the archive under NAME."""
    name = backend.name("named")
    folder = backend.tmp / "folder"
    assert backend.ctl("init", "-n", name, str(folder)).returncode == 0
    record = backend.registry.get_archive(name)
    assert record is not None and record.root == str(folder)


def test_init_archive_passes_nbank_archive_check(backend: Backend) -> None:
    """An archive made by init is clean for nbankctl's check and the real nbank's."""
    folder = backend.tmp / backend.name("chk")
    assert backend.ctl("init", str(folder)).returncode == 0
    proc = backend.ctl("archive", "check", str(folder))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if backend.url is not None:
        proc = backend.nbank("archive", "check", str(folder))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "missing from archive: 0" in proc.stderr


def test_init_says_what_it_did_on_stderr(backend: Backend) -> None:
    """init writes nbank's two lines (registered, initialized) to standard error; stdout
    is empty."""
    folder = backend.tmp / backend.name("said")
    proc = backend.ctl("init", str(folder))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        f"registered '{folder}' as archive '{folder.name}'",
        f"initialized neurobank archive in {folder}",
    ]
    assert proc.stdout == ""


def test_init_unknown_group_registers_nothing(backend: Backend) -> None:
    """init -g with a group that does not exist exits 2 naming it, before registering."""
    folder = backend.tmp / backend.name("nogroup")
    proc = backend.ctl("init", "-g", "no-such-group-here", str(folder))
    assert proc.returncode == 2 and "group 'no-such-group-here' does not exist" in proc.stderr
    assert backend.registry.get_archive(folder.name) is None and not folder.exists()


def test_init_refuses_existing_archive(backend: Backend) -> None:
    """init on a folder that already holds nbank.json exits 2 and changes nothing."""
    archive, _ = backend.archive()
    before = archive.config_path.read_bytes()
    proc = backend.ctl("init", "-n", backend.name("again"), str(archive.path))
    assert proc.returncode == 2
    assert "nbank.json" in proc.stderr and "already exists" in proc.stderr
    assert archive.config_path.read_bytes() == before


# --- search, info, modify -----------------------------------------------------------


def test_search_by_dtype_lists_names(backend: Backend) -> None:
    """search -d DTYPE prints the names of the matching resources, as nbank does."""
    _, arch = backend.archive()
    names = {
        backend.resource(backend.blob("one"), arch),
        backend.resource(backend.blob("two"), arch),
    }
    proc = backend.ctl("search", "-d", backend.dtype)
    assert proc.returncode == 0, proc.stderr
    assert set(proc.stdout.split()) == names
    if backend.url is not None:
        assert set(backend.nbank("search", "-d", backend.dtype).stdout.split()) == names


def test_search_by_metadata_and_exclusion(backend: Backend) -> None:
    """search -k KEY=VALUE filters on metadata; -K KEY=VALUE excludes."""
    _, arch = backend.archive()
    a = backend.resource(backend.blob("a"), arch, metadata={"bird": "b1", "n": 3})
    b = backend.resource(backend.blob("b"), arch, metadata={"bird": "b2", "n": 3})
    proc = backend.ctl("search", "-d", backend.dtype, "-k", "bird=b1")
    assert proc.stdout.split() == [a]
    proc = backend.ctl("search", "-d", backend.dtype, "-k", "n=3", "-K", "bird=b1")
    assert proc.stdout.split() == [b]
    if backend.url is not None:
        nb = backend.nbank("search", "-d", backend.dtype, "-k", "n=3", "-K", "bird=b1")
        assert nb.stdout.split() == [b]


def test_search_json_prints_records(backend: Backend) -> None:
    """search --json prints full registry records."""
    _, arch = backend.archive()
    name = backend.resource(backend.blob("json"), arch)
    proc = backend.ctl("search", "--json", "-H", sha1(backend.blob("json")))
    [record] = json_stream(proc.stdout)
    assert record["name"] == name and record["sha1"] == sha1(backend.blob("json"))
    assert record["locations"] == [arch]


def test_search_without_filters_is_usage_error(backend: Backend) -> None:
    """search with no filter at all exits 2 with a message."""
    proc = backend.ctl("search")
    assert proc.returncode == 2 and "at least one filter" in proc.stderr


def test_info_prints_records_like_nbank(backend: Backend) -> None:
    """info prints each record as JSON; the real nbank info agrees."""
    _, arch = backend.archive()
    a = backend.resource(backend.blob("i1"), arch, metadata={"k": "v"})
    b = backend.resource(backend.blob("i2"), arch)
    proc = backend.ctl("info", a, b)
    assert proc.returncode == 0, proc.stderr
    records = {r["name"]: r for r in json_stream(proc.stdout)}
    assert records[a]["metadata"] == {"k": "v"} and records[b]["sha1"] == sha1(backend.blob("i2"))
    if backend.url is not None:
        theirs = {r["name"]: r for r in json_stream(backend.nbank("info", a, b).stdout)}
        for key in ("sha1", "dtype", "metadata", "locations"):
            assert records[a][key] == theirs[a][key]


def test_info_unknown_id_exits_1(backend: Backend) -> None:
    """info on an unregistered id says not found and exits 1."""
    missing = backend.name("missing")
    proc = backend.ctl("info", missing)
    assert proc.returncode == 1
    assert json_stream(proc.stdout) == [{"id": missing, "error": "not found"}]
    assert missing in proc.stderr


def test_modify_merges_and_deletes_metadata(backend: Backend) -> None:
    """modify -k sets keys, -K deletes them; nbank info sees the change."""
    _, arch = backend.archive()
    name = backend.resource(backend.blob("m"), arch, metadata={"keep": 1, "drop": 2})
    proc = backend.ctl("modify", "-k", "new=[1, 2]", "-k", "s=text", "-K", "drop", name)
    assert proc.returncode == 0, proc.stderr
    expected = {"keep": 1, "new": [1, 2], "s": "text"}
    assert json_stream(proc.stdout)[0]["metadata"] == expected
    record = backend.registry.get_resource(name)
    assert record is not None and record.metadata == expected
    if backend.url is not None:
        assert json_stream(backend.nbank("info", name).stdout)[0]["metadata"] == expected


def test_modify_refuses_metadata_that_is_not_utf8(backend: Backend) -> None:
    """modify -k with a key or value holding bytes that are not UTF-8 is a usage error
    (exit 2) naming the option; the record's metadata is left as it was."""
    _, arch = backend.archive()
    name = backend.resource(backend.blob("u"), arch, metadata={"keep": 1})
    for option in ("k\udcff=1", "k=\udcff", 'k=["\udcff"]'):
        proc = backend.ctl("modify", "-k", option, name)
        assert proc.returncode == 2 and "-k 'k" in proc.stderr, proc.stderr
    record = backend.registry.get_resource(name)
    assert record is not None and record.metadata == {"keep": 1}


def test_modify_unknown_id_exits_1(backend: Backend) -> None:
    """modify on an unregistered id reports it and exits 1."""
    missing = backend.name("missing")
    proc = backend.ctl("modify", "-k", "a=1", missing)
    assert proc.returncode == 1 and missing in proc.stderr


# --- locate, verify ------------------------------------------------------------------


def test_locate_prints_local_path(backend: Backend) -> None:
    """locate prints the path of a copy in an archive on this host."""
    archive, arch = backend.archive()
    name = backend.resource(backend.blob("loc"), arch)
    path = store(archive, name, backend.blob("loc"))
    proc = backend.ctl("locate", name)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [name, str(path)]
    if backend.url is not None:
        assert backend.nbank("locate", name).stdout.split() == [name, str(path)]


def test_locate_link_and_print0(backend: Backend) -> None:
    """locate -L DIR makes a symlink to the local copy; -0 prints NUL-separated paths."""
    archive, arch = backend.archive()
    a, b = backend.resource(backend.blob("L1"), arch), backend.resource(backend.blob("L2"), arch)
    pa, pb = store(archive, a, backend.blob("L1")), store(archive, b, backend.blob("L2"))
    links = backend.tmp / "links"
    links.mkdir()
    assert backend.ctl("locate", "-L", str(links), a).returncode == 0
    assert (links / pa.name).readlink() == pa
    proc = backend.ctl("locate", "-0", a, b)
    assert proc.returncode == 0 and proc.stdout == f"{pa}\0{pb}\0"


def test_locate_unknown_id_exits_1(backend: Backend) -> None:
    """locate on an unregistered id prints (not found) and exits 1."""
    missing = backend.name("missing")
    proc = backend.ctl("locate", missing)
    assert proc.returncode == 1 and "(not found)" in proc.stdout


def test_verify_finds_resource_by_hash(backend: Backend) -> None:
    """verify FILE finds the resource whose sha1 matches the file's."""
    _, arch = backend.archive()
    name = backend.resource(backend.blob("verify me"), arch)
    f = backend.tmp / "copy.bin"
    f.write_bytes(backend.blob("verify me"))
    proc = backend.ctl("verify", str(f))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{f}: matches registry resource {name}"


def test_verify_with_id_mismatch_exits_1(backend: Backend) -> None:
    """verify -i ID FILE exits 1 when the file differs from ID's record."""
    _, arch = backend.archive()
    name = backend.resource(backend.blob("original"), arch)
    f = backend.tmp / "changed.bin"
    f.write_bytes(b"changed")
    proc = backend.ctl("verify", "-i", name, str(f))
    assert proc.returncode == 1 and "FAILED to match record" in proc.stdout
    f.write_bytes(backend.blob("original"))
    assert backend.ctl("verify", "-i", name, str(f)).stdout.strip() == f"{f}: OK"


def test_verify_unregistered_file_exits_1(backend: Backend) -> None:
    """verify on a file no record matches exits 1 with 'no matches'."""
    f = backend.tmp / "unknown.bin"
    f.write_bytes(os.urandom(32))
    proc = backend.ctl("verify", str(f))
    assert proc.returncode == 1 and "no matches in registry" in proc.stdout


# --- dtype, archive list, registry-info ------------------------------------------------


def test_dtype_add_then_list(backend: Backend) -> None:
    """dtype add creates a datatype that dtype list shows with its content type."""
    name = backend.name("dt")
    proc = backend.ctl("dtype", "add", name, "audio/wav")
    assert proc.returncode == 0, proc.stderr
    listing = backend.ctl("dtype", "list").stdout.splitlines()
    assert any(line.split() == [name, "(audio/wav)"] for line in listing)
    if backend.url is not None:
        assert any(name in line for line in backend.nbank("dtype", "list").stdout.splitlines())


def test_archive_list_shows_root(backend: Backend) -> None:
    """archive list -n NAME shows the archive's name and root."""
    archive, arch = backend.archive()
    proc = backend.ctl("archive", "list", "-n", arch)
    assert proc.stdout.split() == [arch, str(archive.path)]


def test_dtype_add_says_so_on_stderr(backend: Backend) -> None:
    """dtype add names the new datatype on standard error, as nbank's log; stdout is empty."""
    name = backend.name("dt")
    proc = backend.ctl("dtype", "add", name, "audio/wav")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == f"added datatype {name} (content-type: audio/wav)\n"
    assert proc.stdout == ""


def test_registry_info_names_address(backend: Backend) -> None:
    """registry-info writes the registry's address and API version to standard error,
    as nbank's log; stdout is empty."""
    proc = backend.ctl("registry-info")
    assert proc.returncode == 0, proc.stderr
    assert backend.registry.url in proc.stderr and "api_version: 1.2" in proc.stderr
    assert proc.stdout == ""


# --- archive check -----------------------------------------------------------------------


def test_archive_check_reports_each_problem(backend: Backend) -> None:
    """archive check finds missing, unregistered, corrupt, misplaced files and bad modes."""
    archive, arch = backend.archive()
    good = backend.resource(backend.blob("good"), arch)
    store(archive, good, backend.blob("good"))
    missing = backend.resource(backend.blob("gone"), arch)
    corrupt = backend.resource(backend.blob("right"), arch)
    store(archive, corrupt, backend.blob("wrong")).chmod(0o644)
    stray = store(archive, backend.name("stray"), backend.blob("stray"))
    (archive.staging_dir / "leftover.zip").write_bytes(b"x")
    proc = backend.ctl("archive", "check", str(archive.path))
    assert proc.returncode == 1
    out = proc.stderr
    assert f"{missing} - missing from archive" in out
    assert f"{stray} - missing from registry" in out
    assert f"{corrupt} : " in out and "hash mismatch" in out
    assert "leftover.zip - incomplete transfer" in out and "mode 0644, expected 0444" in out
    assert out.strip().endswith(
        "Resources in registry: 3; missing from archive: 1; missing from registry: 1; "
        "read/verify errors: 1; other layout errors: 1; permission errors: 1; "
        "registered elsewhere: 0"
    )


def test_archive_check_hashes_by_default(backend: Backend) -> None:
    """archive check reads and hashes every stored file unless told not to, as nbank
    does: a flipped byte fails the default check; --no-hash skips the bytes and says so;
    -H, the old way to ask for hashes, is still accepted."""
    archive, arch = backend.archive()
    name = backend.resource(backend.blob("right"), arch)
    store(archive, name, backend.blob("wrong"))
    default = backend.ctl("archive", "check", str(archive.path))
    assert default.returncode == 1 and "hash mismatch" in default.stderr
    assert backend.ctl("archive", "check", "-H", str(archive.path)).returncode == 1
    skipped = backend.ctl("archive", "check", "--no-hash", str(archive.path))
    assert skipped.returncode == 0 and "SHA-1s not verified (--no-hash)" in skipped.stderr


def test_archive_check_verbose_lists_every_resource(backend: Backend) -> None:
    """-v lists each resource that passed, not only the problems."""
    archive, arch = backend.archive()
    names = [backend.resource(backend.blob(f"v{n}"), arch) for n in range(3)]
    for n, name in enumerate(names):
        store(archive, name, backend.blob(f"v{n}"))
    proc = backend.ctl("archive", "check", "-v", str(archive.path))
    assert proc.returncode == 0
    for name in names:
        assert f" - {name} : " in proc.stderr and proc.stderr.count(f" - {name} : ") == 1
    quiet = backend.ctl("archive", "check", str(archive.path))
    assert all(f" - {name} : " not in quiet.stderr for name in names)


def _legacy_one_character(backend: Backend, id: str) -> tuple[Archive, Path, bytes]:
    """A registered one-character resource filed where nbank 0.13's deposit puts it
    (each test its own character: the django-neurobank server is shared)."""
    archive, arch = backend.archive()
    data = backend.blob("one character")
    backend.resource(data, arch, name=id)
    legacy = archive.resources_dir / f"{id}."
    legacy.mkdir()
    apply_access(archive, legacy)
    path = legacy / f"{id}.dat"
    path.write_bytes(data)
    apply_access(archive, path)
    return archive, path, data


def test_archive_check_fix_moves_misplaced_within_resources(backend: Backend) -> None:
    """A resource in the wrong stub folder (q.dat in resources/q./) is reported
    misplaced; --fix moves it to resources/q/ and the check is then clean."""
    archive, legacy, data = _legacy_one_character(backend, "q")
    proc = backend.ctl("archive", "check", str(archive.path))
    assert proc.returncode == 1 and f"{legacy} - misplaced" in proc.stderr, proc.stderr
    proc = backend.ctl("archive", "check", "--fix", str(archive.path))
    proper = archive.resources_dir / "q" / "q.dat"
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"moved {legacy} -> {proper}" in proc.stderr
    assert proper.read_bytes() == data and not legacy.parent.exists()
    if backend.url is not None:
        proc = backend.nbank("archive", "check", str(archive.path))
        assert "other layout errors: 0" in proc.stderr, proc.stderr


def test_archive_check_fix_never_overwrites(backend: Backend) -> None:
    """With the identifier also stored where it belongs, --fix moves nothing: both
    files stay and the check still reports the second copy."""
    archive, legacy, data = _legacy_one_character(backend, "z")
    proper = archive.resources_dir / "z" / "z.wav"
    proper.parent.mkdir()
    proper.write_bytes(b"another file")
    proc = backend.ctl("archive", "check", "--fix", str(archive.path))
    assert proc.returncode == 1 and "moved" not in proc.stderr
    assert legacy.read_bytes() == data and proper.read_bytes() == b"another file"


# --- choosing the registry, credentials, errors ------------------------------------------


def test_auth_option_warns_about_argv(backend: Backend) -> None:
    """-a user:pass warns that argv is visible to other users and never echoes the password."""
    proc = backend.ctl("-a", "someone:secret", "dtype", "list")
    assert proc.returncode == 0
    assert "other users" in proc.stderr and "secret" not in proc.stderr + proc.stdout


def test_auth_option_authenticates_writes(django_backend: Backend) -> None:
    """-a user:pass is used for writes when there is no netrc."""
    backend = django_backend
    assert isinstance(backend.registry, HttpRegistry)
    (backend.tmp / "home" / ".netrc").unlink()
    user, password = backend.registry._auth or ("", "")
    name = backend.name("dt")
    proc = backend.ctl("-a", f"{user}:{password}", "dtype", "add", name, "text/plain")
    assert proc.returncode == 0, proc.stderr
    assert "other users" in proc.stderr
    assert any(d.name == name for d in backend.registry.list_datatypes())


def test_write_without_credentials_exits_3(django_backend: Backend) -> None:
    """A write refused for lack of credentials exits 3 naming the registry."""
    backend = django_backend
    (backend.tmp / "home" / ".netrc").unlink()
    proc = backend.ctl("dtype", "add", backend.name("dt"), "text/plain")
    assert proc.returncode == 3 and backend.url in proc.stderr
    assert "credentials" in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_registry_exits_3_naming_url(tmp_path: Path) -> None:
    """A registry nobody answers at makes nbankctl exit 3 with the URL in the message."""
    url = f"http://127.0.0.1:{_free_port()}/neurobank/"
    env = base_env(tmp_path / "home")
    proc = subprocess.run(
        [NBANKCTL, "-r", url, "info", "abc"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 3
    assert url in proc.stderr and "unreachable" in proc.stderr


def test_nbank_registry_variable_is_used(tmp_path: Path, django_registry: Any) -> None:
    """$NBANK_REGISTRY chooses the registry when -r is not given."""
    env = base_env(tmp_path / "home")
    env["NBANK_REGISTRY"] = django_registry.url
    env["NBANKD_CONFIG"] = str(tmp_path / "missing.yaml")
    proc = subprocess.run(
        [NBANKCTL, "registry-info"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and django_registry.url in proc.stderr


def test_no_registry_anywhere_exits_2(tmp_path: Path) -> None:
    """With no -r, no $NBANK_REGISTRY and no configuration, nbankctl exits 2 saying how."""
    env = base_env(tmp_path / "home")
    config = tmp_path / "absent.yaml"
    proc = subprocess.run(
        [NBANKCTL, "info", "abc", "-c", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert str(config) in proc.stderr and "-r" in proc.stderr


def test_config_option_selects_embedded_registry(tmp_path: Path) -> None:
    """-c CONFIG with registry: embedded opens that configuration's database."""
    state = tmp_path / "state"
    config = tmp_path / "c.yaml"
    config.write_text(f"registry: embedded\nstate_dir: {state}\n")
    with EmbeddedRegistry(state / "registry.sqlite3") as reg:
        reg.add_datatype("only-here", "text/plain")
    env = base_env(tmp_path / "home")
    proc = subprocess.run(
        [NBANKCTL, "dtype", "list", "-c", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "only-here" in proc.stdout


def test_embedded_database_missing_exits_2(tmp_path: Path) -> None:
    """An embedded configuration whose database does not exist yet is a clear error, exit 2."""
    config = tmp_path / "c.yaml"
    config.write_text(f"registry: embedded\nstate_dir: {tmp_path / 'state'}\n")
    env = base_env(tmp_path / "home")
    proc = subprocess.run(
        [NBANKCTL, "dtype", "list", "-c", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "registry.sqlite3" in proc.stderr
    assert not (tmp_path / "state" / "registry.sqlite3").exists()

"""nbankctl's registry commands side by side with the real nbank 0.13 on one
django-neurobank server: registry-info, archive list, verify, modify and init give the
same records and the same output on the same streams, identifiers aside; exit codes
follow the README's table (nbank 1 for every failure; nbankctl 1 problems, 2 usage or
configuration, 3 unreachable)."""

from __future__ import annotations

import grp
import json
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

from fixtures.cli_backends import NBANK, NBANKCTL, Backend, base_env, json_stream, store
from fixtures.django_server import DjangoServer

#: fields of a resource's record that differ between two resources by construction
OWN_FIELDS = ("name", "sha1", "filename", "created_on")


def same_but_identity(record: dict[str, Any]) -> dict[str, Any]:
    """A resource's record without what makes it this resource (name, SHA-1, creation)."""
    return {k: v for k, v in record.items() if k not in OWN_FIELDS}


def both(backend: Backend, *argv: str) -> tuple[subprocess.CompletedProcess[str], ...]:
    """The same command run by nbank and then by nbankctl, on the same registry."""
    return backend.nbank(*argv), backend.ctl(*argv)


# --- registry-info ---------------------------------------------------------------------


def test_registry_info_same_lines_on_stderr(django_backend: Backend) -> None:
    """registry-info: the same lines as nbank's, on standard error; stdout stays empty."""
    theirs, ours = both(django_backend, "registry-info")
    assert (theirs.returncode, ours.returncode) == (0, 0), theirs.stderr + ours.stderr
    assert theirs.stderr.splitlines()[0] == "registry info:"
    assert ours.stderr == theirs.stderr
    assert ours.stdout == theirs.stdout == ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_registry_info_unreachable_exit_codes(tmp_path: Path) -> None:
    """A registry nobody answers at: nbank exits 1, nbankctl 3 (the README's table)."""
    url = f"http://127.0.0.1:{_free_port()}/neurobank/"
    env = base_env(tmp_path / "home")
    env["NBANKD_CONFIG"] = str(tmp_path / "no-such-config.yaml")
    run = [
        subprocess.run([tool, "-r", url, "registry-info"], env=env, capture_output=True, text=True)
        for tool in (NBANK, NBANKCTL)
    ]
    assert [r.returncode for r in run] == [1, 3], [r.stderr for r in run]
    assert [r.stdout for r in run] == ["", ""]


# --- archive list ----------------------------------------------------------------------


def _archives(backend: Backend) -> tuple[str, str]:
    """A neurobank archive and a tape archive of this test; returns their names."""
    _, local = backend.archive()
    tape = backend.name("tp")
    backend.registry.add_archive(tape, "tape", f"{tape}:1", "offline")
    return local, tape


def test_archive_list_same_as_nbank(django_backend: Backend) -> None:
    """archive list prints the same lines as nbank's, every archive of the server."""
    local, tape = _archives(django_backend)
    theirs, ours = both(django_backend, "archive", "list")
    assert (theirs.returncode, ours.returncode) == (0, 0), theirs.stderr + ours.stderr
    assert sorted(ours.stdout.splitlines()) == sorted(theirs.stdout.splitlines())
    names = [line.split()[0] for line in ours.stdout.splitlines()]
    assert local in names and tape in names


def test_archive_list_by_scheme_same_as_nbank(django_backend: Backend) -> None:
    """archive list --scheme tape prints the same tape:// lines as nbank's, no others."""
    local, tape = _archives(django_backend)
    theirs, ours = both(django_backend, "archive", "list", "--scheme", "tape")
    assert (theirs.returncode, ours.returncode) == (0, 0), theirs.stderr + ours.stderr
    assert sorted(ours.stdout.splitlines()) == sorted(theirs.stdout.splitlines())
    assert f"tape://{tape}:1" in ours.stdout and local not in ours.stdout


def test_archive_list_by_scheme_and_name_same_as_nbank(django_backend: Backend) -> None:
    """archive list --scheme neurobank -n NAME prints nbank's one line exactly."""
    local, _ = _archives(django_backend)
    theirs, ours = both(django_backend, "archive", "list", "--scheme", "neurobank", "-n", local)
    assert (theirs.returncode, ours.returncode) == (0, 0), theirs.stderr + ours.stderr
    assert ours.stdout == theirs.stdout and ours.stdout.startswith(local)


# --- verify ----------------------------------------------------------------------------


def test_verify_same_lines_as_nbank(django_backend: Backend) -> None:
    """verify: a file named by its id, a copy found by its SHA-1, a file no record
    matches and a missing path give nbank's lines and both exit 1."""
    backend = django_backend
    archive, arch = backend.archive()
    named = store(archive, backend.resource(backend.blob("named"), arch), backend.blob("named"))
    found = backend.resource(backend.blob("found"), arch)
    copy = backend.tmp / "some copy.bin"
    copy.write_bytes(backend.blob("found"))
    stray = backend.tmp / "stray.bin"
    stray.write_bytes(backend.blob("nobody's"))
    missing = backend.tmp / "missing.bin"
    theirs, ours = both(backend, "verify", str(named), str(copy), str(stray), str(missing))
    assert (theirs.returncode, ours.returncode) == (1, 1), theirs.stderr + ours.stderr
    assert ours.stdout == theirs.stdout
    assert f"{copy}: matches registry resource {found}" in ours.stdout


def test_verify_all_good_exits_0_like_nbank(django_backend: Backend) -> None:
    """verify of files that all match: nbank's lines, and both exit 0."""
    backend = django_backend
    archive, arch = backend.archive()
    paths = [
        str(store(archive, backend.resource(backend.blob(x), arch), backend.blob(x)))
        for x in ("a", "b")
    ]
    theirs, ours = both(backend, "verify", *paths)
    assert (theirs.returncode, ours.returncode) == (0, 0), theirs.stdout + ours.stdout
    assert ours.stdout == theirs.stdout == "".join(f"{p}: OK\n" for p in paths)


def test_verify_changed_file_fails_like_nbank(django_backend: Backend) -> None:
    """A file named by its id whose bytes changed fails in both (exit 1); nbankctl's
    line is nbank's, followed by the registered SHA-1."""
    backend = django_backend
    archive, arch = backend.archive()
    id = backend.resource(backend.blob("recorded"), arch)
    path = store(archive, id, backend.blob("recorded"))
    path.chmod(0o644)
    path.write_bytes(b"changed")
    theirs, ours = both(backend, "verify", str(path))
    assert (theirs.returncode, ours.returncode) == (1, 1)
    assert theirs.stdout == f"{path}: FAILED to match record for {id}\n"
    assert ours.stdout.startswith(theirs.stdout.rstrip("\n") + " (registered ")


# --- modify ----------------------------------------------------------------------------


def test_modify_same_records_as_nbank(
    django_backend: Backend, django_registry: DjangoServer
) -> None:
    """The same modify by nbank on one resource and by nbankctl on another: the same
    JSON on stdout and the same records in `nbank info`, identifiers aside."""
    backend = django_backend
    _, arch = backend.archive()
    start = {"keep": 1, "drop": 2, "nested": {"a": 1}}
    mine, yours = (
        backend.resource(backend.blob(x), arch, metadata=start) for x in ("mine", "yours")
    )
    animal = django_registry.add_animal()
    change = ["-k", "new=[1, 2]", "-k", "s=text", "-k", "flag=True", "-K", "drop"]
    change += ["--experimenter", django_registry.username, "--animal", animal]
    theirs = backend.nbank("modify", *change, yours)
    ours = backend.ctl("modify", *change, mine)
    assert (theirs.returncode, ours.returncode) == (0, 0), theirs.stderr + ours.stderr
    [their_out], [our_out] = json_stream(theirs.stdout), json_stream(ours.stdout)
    assert same_but_identity(our_out) == same_but_identity(their_out)
    metadata = our_out["metadata"]
    assert "drop" not in metadata and (metadata["new"], metadata["s"]) == ([1, 2], "text")
    assert (metadata["keep"], metadata["nested"], metadata["flag"]) == (1, {"a": 1}, True)
    info = backend.nbank("info", yours, mine)
    records = {r["name"]: r for r in json_stream(info.stdout)}
    assert same_but_identity(records[mine]) == same_but_identity(records[yours])
    assert (records[mine]["experimenter"], records[mine]["animal"]) == (
        django_registry.username,
        animal,
    )


def test_modify_clearing_fields_same_as_nbank(
    django_backend: Backend, django_registry: DjangoServer
) -> None:
    """modify --experimenter '' --animal '' clears both fields, in nbank and nbankctl."""
    backend = django_backend
    _, arch = backend.archive()
    animal = django_registry.add_animal()
    full = {"experimenter": django_registry.username, "animal": animal}
    mine, yours = (backend.resource(backend.blob(x), arch, metadata=full) for x in "my")
    theirs = backend.nbank("modify", "--experimenter", "", "--animal", "", yours)
    ours = backend.ctl("modify", "--experimenter", "", "--animal", "", mine)
    assert (theirs.returncode, ours.returncode) == (0, 0), theirs.stderr + ours.stderr
    records = {r["name"]: r for r in json_stream(backend.nbank("info", yours, mine).stdout)}
    assert same_but_identity(records[mine]) == same_but_identity(records[yours])
    assert (records[mine]["experimenter"], records[mine]["animal"]) == (None, None)


def test_modify_unknown_id_same_as_nbank(django_backend: Backend) -> None:
    """modify of an unregistered id: nbank's JSON line on stdout, and both exit 1."""
    missing = django_backend.name("missing")
    theirs, ours = both(django_backend, "modify", "-k", "a=1", missing)
    assert (theirs.returncode, ours.returncode) == (1, 1)
    assert json_stream(ours.stdout) == json_stream(theirs.stdout)
    assert json_stream(ours.stdout) == [{"name": missing, "error": "not found"}]


# --- init ------------------------------------------------------------------------------


def a_group_of_mine() -> str:
    """A group the current user is in, other than the primary one when there is one."""
    gids = [g for g in os.getgroups() if g != os.getgid()] or [os.getgid()]
    return grp.getgrgid(gids[0]).gr_name


def _init_both(backend: Backend, *options: str) -> tuple[dict[str, Any], ...]:
    """nbank init and nbankctl init with the same options, each in its own new folder;
    returns (theirs, ours): each the run, its folder and its archive name."""
    out = []
    for label, run in (("theirs", backend.nbank), ("ours", backend.ctl)):
        name = backend.name(label)
        folder = backend.tmp / name
        proc = run("init", *options, "-n", name, str(folder))
        out.append({"proc": proc, "folder": folder, "name": name})
    return tuple(out)


def _tree_modes(root: Path) -> dict[str, tuple[int, int]]:
    """Each path of a new archive with its mode and group."""
    paths = ["", "nbank.json", "README.md", ".gitignore", "resources", "staging"]
    return {p: (os.lstat(root / p).st_mode, os.lstat(root / p).st_gid) for p in paths}


def test_init_with_umask_group_shared_same_as_nbank(django_backend: Backend) -> None:
    """init -u 027 -g GROUP --shared: nbank.json, modes and groups as nbank's; both
    registered with their folder as root; the same messages on stderr, none on stdout."""
    group = a_group_of_mine()
    theirs, ours = _init_both(django_backend, "-u", "027", "-g", group, "--shared")
    for side in (theirs, ours):
        assert side["proc"].returncode == 0, side["proc"].stderr
        record = django_backend.registry.get_archive(side["name"])
        assert record is not None and record.root == str(side["folder"])
    config = json.loads((ours["folder"] / "nbank.json").read_text())
    assert config == json.loads((theirs["folder"] / "nbank.json").read_text())
    assert config["policy"]["access"] == {
        "user": None,
        "group": group,
        "umask": 0o027,
        "read_only_resources": True,
    }
    assert _tree_modes(ours["folder"]) == _tree_modes(theirs["folder"])
    said = {side["name"]: side["proc"].stderr for side in (theirs, ours)}
    assert said[ours["name"]].replace(ours["name"], "X") == said[theirs["name"]].replace(
        theirs["name"], "X"
    )
    assert ours["proc"].stdout == theirs["proc"].stdout == ""


def test_init_owner_and_primary_group_same_as_nbank(django_backend: Backend) -> None:
    """init without options: the same nbank.json as nbank's (this user as owner, the
    primary group, umask 002)."""
    theirs, ours = _init_both(django_backend)
    assert (theirs["proc"].returncode, ours["proc"].returncode) == (0, 0)
    config = json.loads((ours["folder"] / "nbank.json").read_text())
    assert config == json.loads((theirs["folder"] / "nbank.json").read_text())
    assert config["policy"]["access"]["group"] == grp.getgrgid(os.getgid()).gr_name
    assert config["policy"]["access"]["umask"] == 0o002


def test_init_unknown_group_registers_nothing_like_nbank(django_backend: Backend) -> None:
    """init -g with a group that does not exist: nothing registered and no folder, in
    both; nbank exits 1 and nbankctl 2 (a usage error)."""
    theirs, ours = _init_both(django_backend, "-g", "no-such-group-here")
    assert (theirs["proc"].returncode, ours["proc"].returncode) == (1, 2)
    for side in (theirs, ours):
        assert "no-such-group-here" in side["proc"].stderr
        assert django_backend.registry.get_archive(side["name"]) is None
        assert not side["folder"].exists()

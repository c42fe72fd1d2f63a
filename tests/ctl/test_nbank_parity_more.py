"""nbankctl side by side with the real nbank 0.13 on the same django-neurobank 0.12
server: ``check all`` (with -v, --fix, --no-hash), ``search``'s filters, ``copy -f``,
``locate`` given a resource's URL, and the top-level ``-v`` and ``--debug``.

Same records and same files, same findings; exit codes as in the README's table
(nbankctl: 0 ok, 1 problems, 2 usage, 3 unreachable; nbank: 1 for every failure).
``check all`` looks at every archive of its registry, so its tests run on a server of
their own (the session's server holds every other test's archives)."""

from __future__ import annotations

import base64
import http.server
import json
import os
import re
import socket
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.cli_backends import (
    NBANK,
    NBANKCTL,
    Backend,
    base_env,
    json_stream,
    make_backend,
    store,
)
from fixtures.django_server import SQLITE_DATABASE, DjangoServer, serve_site
from nbankd import __version__
from nbankd.archive.layout import Archive
from nbankd.registry.http import HttpRegistry


@pytest.fixture
def own(tmp_path: Path) -> Iterator[Backend]:
    """A django-neurobank server of this test's own, nbankctl and nbank pointed at it."""
    with serve_site(tmp_path / "site", SQLITE_DATABASE) as server:
        env = base_env(tmp_path / "home")
        server.write_netrc(tmp_path / "home" / ".netrc")
        env["NBANKD_CONFIG"] = str(tmp_path / "no-such-config.yaml")
        registry = HttpRegistry(server.url, server.auth)
        b = Backend("django", tmp_path, registry, env, ["-r", server.url], url=server.url)
        b.dtype = registry.add_datatype("dt", "application/octet-stream").name
        try:
            yield b
        finally:
            registry.close()


def run(
    argv: list[str], env: dict[str, str], input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, input=input, capture_output=True, text=True, timeout=120)


def free_port() -> int:
    """A loopback port nobody listens on (bound, then let go)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- check all ----------------------------------------------------------------------------


def clean_archive(b: Backend, n: int = 1) -> tuple[Archive, str, list[str]]:
    """A registered archive holding n stored resources that match their records."""
    archive, name = b.archive("clean")
    ids = []
    for i in range(n):
        ids.append(b.resource(b.blob(f"c{i}"), name))
        store(archive, ids[-1], b.blob(f"c{i}"))
    return archive, name, ids


def faulty_archive(b: Backend) -> tuple[Archive, str, dict[str, str]]:
    """A registered archive with a corrupt copy, a missing one and an unregistered file."""
    archive, name = b.archive("faulty")
    corrupt = b.resource(b.blob("right"), name)
    store(archive, corrupt, b.blob("wrong"))
    gone = b.resource(b.blob("gone"), name)
    stray = b.name("stray")
    store(archive, stray, b.blob("stray"))
    return archive, name, {"corrupt": corrupt, "gone": gone, "stray": stray}


def sections(report: str) -> dict[str, list[str]]:
    """A ``check all`` report's lines by archive ("" for the registry's and the end's)."""
    out: dict[str, list[str]] = {"": []}
    current = ""
    for line in report.splitlines():
        if m := re.match(r"archive (\S+): /", line):
            current = m.group(1)
            out[current] = []
        elif line.startswith("skipped archives:"):
            current = ""
        out[current].append(line)
    return out


def summary(lines: list[str]) -> str:
    return next(line for line in lines if line.startswith("Resources in registry:"))


def named(lines: list[str], ids: list[str]) -> set[str]:
    """The ids among ``ids`` that a finding line (`` - ...``) names."""
    return {id for id in ids for line in lines if line.startswith(" - ") and id in line}


def verdict(report: str) -> str:
    return report.strip().splitlines()[-1]


def test_check_all_finds_what_nbank_finds(own: Backend) -> None:
    """On a registry with a clean and a faulty archive, both fail the faulty one alone
    (exit 1), with the same summary line per archive and the same resources named."""
    _, good, good_ids = clean_archive(own)
    _, bad, problems = faulty_archive(own)
    ours = own.ctl("check", "all")
    theirs = own.nbank("check", "all")
    assert ours.returncode == theirs.returncode == 1, theirs.stderr
    assert verdict(ours.stderr) == verdict(theirs.stderr) == f"failed checks: {bad}"
    mine, real = sections(ours.stderr), sections(theirs.stderr)
    assert summary(mine[good]) == summary(real[good])
    assert summary(mine[bad]) == summary(real[bad])
    everything = [*good_ids, *problems.values()]
    assert named(mine[bad], everything) == named(real[bad], everything) == set(problems.values())
    assert named(mine[good], everything) == named(real[good], everything) == set()


def test_check_all_clean_registry_exits_0_as_nbank(own: Backend) -> None:
    """A registry whose archives are all clean passes both checks (exit 0)."""
    clean_archive(own, 2)
    ours = own.ctl("check", "all")
    theirs = own.nbank("check", "all")
    assert ours.returncode == theirs.returncode == 0, ours.stderr + theirs.stderr
    assert verdict(ours.stderr) == verdict(theirs.stderr) == "all checks passed"


def test_check_all_verbose_lists_every_resource_as_nbank(own: Backend) -> None:
    """With -v both list each resource checked, with its path, as OK."""
    archive, _, ids = clean_archive(own, 2)

    def listed(text: str) -> set[tuple[str, str]]:
        return set(re.findall(r"^ - (\S+) : (\S+) - OK$", text, re.MULTILINE))

    ours = own.ctl("check", "all", "-v")
    theirs = own.nbank("check", "all", "-v")
    assert ours.returncode == theirs.returncode == 0, ours.stderr
    expected = {(id, str(archive.resources_dir / id[:2] / f"{id}.dat")) for id in ids}
    assert listed(ours.stderr) == listed(theirs.stderr) == expected
    assert listed(own.ctl("check", "all").stderr) == set()


def test_check_all_no_hash_leaves_a_corrupt_copy_unread_as_nbank(own: Backend) -> None:
    """--no-hash passes a copy whose bytes differ from its record (both exit 0); hashing,
    both fail it (exit 1)."""
    archive, name = own.archive()
    id = own.resource(own.blob("right"), name)
    store(archive, id, own.blob("wrong"))
    unhashed = [own.ctl("check", "all", "--no-hash"), own.nbank("check", "all", "--no-hash")]
    assert [p.returncode for p in unhashed] == [0, 0], unhashed[0].stderr + unhashed[1].stderr
    hashed = [own.ctl("check", "all"), own.nbank("check", "all")]
    assert [p.returncode for p in hashed] == [1, 1]


def test_check_all_fix_satisfies_nbank(own: Backend) -> None:
    """Both count a writable file and an open stub folder as 2 permission errors;
    after nbankctl check all --fix (exit 0) nbank finds none (exit 0)."""
    archive, _, [id] = clean_archive(own)
    path = archive.resources_dir / id[:2] / f"{id}.dat"
    path.chmod(0o664)
    path.parent.chmod(0o755)
    before = [own.ctl("check", "all"), own.nbank("check", "all")]
    assert [p.returncode for p in before] == [1, 1]
    assert all("permission errors: 2" in p.stderr for p in before), before[1].stderr
    fixed = own.ctl("check", "all", "--fix")
    assert fixed.returncode == 0, fixed.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    after = own.nbank("check", "all")
    assert after.returncode == 0 and "permission errors: 0" in after.stderr, after.stderr


def test_check_all_unreachable_registry_exits_3_where_nbank_exits_1(tmp_path: Path) -> None:
    """With nobody answering at the registry's address nbankctl exits 3, nbank 1."""
    url = f"http://127.0.0.1:{free_port()}/neurobank/"
    env = base_env(tmp_path / "home")
    ours = run([NBANKCTL, "-r", url, "check", "all"], env)
    theirs = run([NBANK, "-r", url, "check", "all"], env)
    assert (ours.returncode, theirs.returncode) == (3, 1), ours.stderr
    assert url in ours.stderr


def test_check_all_usage_error_exits_2_as_nbank(tmp_path: Path) -> None:
    """An option check all does not have is a usage error (2) in both."""
    env = base_env(tmp_path / "home")
    ours = run([NBANKCTL, "-r", "http://127.0.0.1:9/", "check", "all", "--bogus"], env)
    theirs = run([NBANK, "-r", "http://127.0.0.1:9/", "check", "all", "--bogus"], env)
    assert ours.returncode == theirs.returncode == 2
    assert "--bogus" in ours.stderr


# --- search -------------------------------------------------------------------------------


@pytest.fixture
def tagged(django_backend: Backend) -> tuple[Backend, str]:
    """The shared server's backend and a name fragment unique to this test."""
    return django_backend, f"tg{os.urandom(5).hex()}"


def names_of(proc: subprocess.CompletedProcess[str]) -> list[str]:
    assert proc.returncode == 0, proc.stderr
    return sorted(proc.stdout.split())


def both_search(b: Backend, *argv: str) -> tuple[list[str], list[str]]:
    return names_of(b.ctl("search", *argv)), names_of(b.nbank("search", *argv))


def test_search_by_name_fragment_as_nbank(tagged: tuple[Backend, str]) -> None:
    """search NAME gives the same names as nbank: those containing the fragment."""
    b, tag = tagged
    _, arch = b.archive()
    wanted = [b.resource(b.blob(f"n{i}"), arch, name=f"{tag}x{i}") for i in range(3)]
    b.resource(b.blob("other"), arch)
    ours, theirs = both_search(b, tag)
    assert ours == theirs == sorted(wanted)


def test_search_by_archive_as_nbank(tagged: tuple[Backend, str]) -> None:
    """search -n ARCHIVE gives the same names as nbank: the archive's resources alone."""
    b, _ = tagged
    _, one = b.archive("one")
    _, two = b.archive("two")
    there = [b.resource(b.blob(f"a{i}"), one) for i in range(2)]
    b.resource(b.blob("b"), two)
    ours, theirs = both_search(b, "-n", one)
    assert ours == theirs == sorted(there)


def test_search_by_scheme_as_nbank(tagged: tuple[Backend, str]) -> None:
    """search -s tape NAME gives the same names as nbank: those with a tape location."""
    b, tag = tagged
    _, disk = b.archive()
    tape = b.name("tape")
    b.registry.add_archive(tape, "tape", f"{tape}:1")
    on_tape = b.resource(b.blob("t"), tape, name=f"{tag}t")
    b.resource(b.blob("d"), disk, name=f"{tag}d")
    ours, theirs = both_search(b, "-s", "tape", tag)
    assert ours == theirs == [on_tape]


def test_search_by_experimenter_as_nbank(
    tagged: tuple[Backend, str], django_registry: DjangoServer
) -> None:
    """search --experimenter USER NAME gives the same names as nbank."""
    b, tag = tagged
    _, arch = b.archive()
    user = django_registry.username
    by_user = b.resource(b.blob("e"), arch, name=f"{tag}e", metadata={"experimenter": user})
    b.resource(b.blob("n"), arch, name=f"{tag}n")
    ours, theirs = both_search(b, "--experimenter", user, tag)
    assert ours == theirs == [by_user]


def test_search_by_animal_prefix_as_nbank(
    tagged: tuple[Backend, str], django_registry: DjangoServer
) -> None:
    """search --animal PREFIX gives the same names as nbank (the start of the animal's
    identifier is enough)."""
    b, tag = tagged
    _, arch = b.archive()
    animal = django_registry.add_animal()
    his = b.resource(b.blob("a"), arch, name=f"{tag}a", metadata={"animal": animal})
    b.resource(b.blob("n"), arch, name=f"{tag}n")
    ours, theirs = both_search(b, "--animal", animal[:-2], tag)
    assert ours == theirs == [his]


def test_search_json_out_gives_nbank_records(tagged: tuple[Backend, str]) -> None:
    """search -j prints the same records as nbank's -j."""
    b, tag = tagged
    _, arch = b.archive()
    for i in range(2):
        b.resource(b.blob(f"j{i}"), arch, name=f"{tag}j{i}", metadata={"i": i})
    ours, theirs = b.ctl("search", "-j", tag), b.nbank("search", "-j", tag)
    assert ours.returncode == theirs.returncode == 0, ours.stderr

    def records(text: str) -> list[dict[str, object]]:
        return sorted(json_stream(text), key=lambda r: str(r["name"]))

    assert records(ours.stdout) == records(theirs.stdout)
    assert [r["name"] for r in records(ours.stdout)] == [f"{tag}j0", f"{tag}j1"]


# --- copy -f ------------------------------------------------------------------------------


def test_copy_ids_from_a_file_as_nbank(django_backend: Backend) -> None:
    """copy DEST -f FILE copies the ids the file lists (blank lines skipped) and the
    command line's, each once: nbank and nbankctl store the same files."""
    b = django_backend
    src, src_name = b.archive("src")
    ids = [b.resource(b.blob(f"f{i}"), src_name) for i in range(3)]
    for i, id in enumerate(ids):
        store(src, id, b.blob(f"f{i}"))
    listing = b.tmp / "ids.txt"
    listing.write_text(f"{ids[0]}\n\n{ids[1]}\n{ids[0]}\n")
    mine, _ = b.archive("mine")
    real, _ = b.archive("real")
    ours = b.ctl("copy", "-f", str(listing), str(mine.path), ids[2])
    theirs = b.nbank("copy", "-f", str(listing), str(real.path), ids[2])
    assert ours.returncode == theirs.returncode == 0, ours.stderr + theirs.stderr

    def files(archive: Archive) -> list[str]:
        return sorted(p.name for p in archive.resources_dir.rglob("*.dat"))

    assert files(mine) == files(real) == sorted(f"{id}.dat" for id in ids)


def test_copy_from_file_with_an_unknown_id_fails_as_nbank(django_backend: Backend) -> None:
    """An id of -f FILE that the registry lacks fails the copy (exit 1 in both); the
    others are copied."""
    b = django_backend
    src, src_name = b.archive("src")
    id = b.resource(b.blob("k"), src_name)
    store(src, id, b.blob("k"))
    listing = b.tmp / "ids.txt"
    missing = b.name("missing")
    listing.write_text(f"{id}\n{missing}\n")
    mine, _ = b.archive("mine")
    real, _ = b.archive("real")
    ours = b.ctl("copy", str(mine.path), "-f", str(listing))
    theirs = b.nbank("copy", str(real.path), "-f", str(listing))
    assert ours.returncode == theirs.returncode == 1
    assert missing in ours.stderr and missing in theirs.stderr
    for archive in (mine, real):
        assert (archive.resources_dir / id[:2] / f"{id}.dat").is_file()


def test_copy_from_standard_input_as_nbank(django_backend: Backend) -> None:
    """copy -f - reads the ids from standard input, as nbank does."""
    b = django_backend
    src, src_name = b.archive("src")
    id = b.resource(b.blob("s"), src_name)
    store(src, id, b.blob("s"))
    mine, _ = b.archive("mine")
    real, _ = b.archive("real")
    assert b.url is not None
    ours = run([NBANKCTL, *b.before, "copy", str(mine.path), "-f", "-"], b.env, input=f"{id}\n")
    theirs = run([NBANK, "-r", b.url, "copy", str(real.path), "-f", "-"], b.env, input=f"{id}\n")
    assert ours.returncode == theirs.returncode == 0, ours.stderr + theirs.stderr
    for archive in (mine, real):
        assert (archive.resources_dir / id[:2] / f"{id}.dat").is_file()


# --- locate with a resource's URL ---------------------------------------------------------


def stored_resource(b: Backend) -> tuple[str, Path]:
    archive, arch = b.archive()
    id = b.resource(b.blob("loc"), arch)
    return id, store(archive, id, b.blob("loc"))


@pytest.mark.parametrize("end", ["/", ""])
def test_locate_a_resource_url_as_nbank(django_backend: Backend, end: str) -> None:
    """locate REGISTRY/resources/ID/ (or without its last slash) prints the id and its
    path (exit 0), as nbank does."""
    b = django_backend
    id, path = stored_resource(b)
    url = f"{b.url}resources/{id}{end}"
    ours, theirs = b.ctl("locate", url), b.nbank("locate", url)
    assert ours.returncode == theirs.returncode == 0, ours.stderr
    assert ours.stdout.split() == theirs.stdout.split() == [id, str(path)]


def test_locate_url_links_and_print0(django_backend: Backend) -> None:
    """-L DIR and -0 take a resource URL too: the link and the path are the id's."""
    b = django_backend
    id, path = stored_resource(b)
    url = f"{b.url}resources/{id}/"
    links = b.tmp / "links"
    links.mkdir()
    linked = b.ctl("locate", "-L", str(links), url)
    assert linked.returncode == 0 and (links / path.name).readlink() == path
    zero = b.ctl("locate", "-0", url)
    assert zero.returncode == 0 and zero.stdout == f"{path}\0"


def test_locate_url_of_another_registry_is_refused(django_backend: Backend) -> None:
    """A URL of a registry other than the one in use is refused (exit 1) without
    contacting it, naming that registry and the command that looks there."""
    b = django_backend
    id, _ = stored_resource(b)
    elsewhere = f"http://127.0.0.1:{free_port()}/neurobank/"
    proc = b.ctl("locate", f"{elsewhere}resources/{id}/")
    assert proc.returncode == 1, proc.stderr  # not 3: nothing was sent there
    assert f"nbankctl -r {elsewhere} locate {id}" in proc.stderr
    assert "(another registry)" in proc.stdout


@pytest.mark.parametrize("chosen_by", ["-r", "$NBANK_REGISTRY"])
def test_locate_url_of_a_configured_alias_is_looked_up_whoever_chose_the_registry(
    django_backend: Backend, chosen_by: str
) -> None:
    """A URL naming one of the configuration's registry_aliases is looked up in the
    registry in use when -r or $NBANK_REGISTRY names the configuration's registry too."""
    b = django_backend
    assert b.url is not None
    id, path = stored_resource(b)
    alias = b.url.replace("127.0.0.1", "localhost")
    config = b.tmp / "aliased.yaml"
    config.write_text(
        f"registry: {b.url}\nregistry_aliases: [{alias}]\nstate_dir: {b.tmp / 'st'}\n"
    )
    env = {**b.env, "NBANKD_CONFIG": str(config)}
    before = ["-r", b.url] if chosen_by == "-r" else []
    if chosen_by == "$NBANK_REGISTRY":
        env["NBANK_REGISTRY"] = b.url
    proc = run([NBANKCTL, *before, "locate", f"{alias}resources/{id}/"], env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [id, str(path)]


def test_aliases_of_a_configuration_for_another_registry_do_not_count(
    django_backend: Backend,
) -> None:
    """With -r naming another registry than the configuration's, the configuration's
    registry_aliases are not names of the one in use: the alias URL is refused."""
    b = django_backend
    assert b.url is not None
    id, _ = stored_resource(b)
    alias = b.url.replace("127.0.0.1", "localhost")
    config = b.tmp / "other.yaml"
    other = f"http://127.0.0.1:{free_port()}/neurobank/"
    config.write_text(f"registry: {other}\nregistry_aliases: [{alias}]\nstate_dir: {b.tmp}\n")
    env = {**b.env, "NBANKD_CONFIG": str(config)}
    proc = run([NBANKCTL, "-r", b.url, "locate", f"{alias}resources/{id}/"], env)
    assert proc.returncode == 1, proc.stderr
    assert "(another registry)" in proc.stdout


def test_locate_url_with_a_password_never_shows_it(django_backend: Backend) -> None:
    """A resource URL carrying user:password@ is refused or looked up without ever
    echoing the password, whether it names another registry or no resource."""
    b = django_backend
    elsewhere = f"http://u:s3cret@127.0.0.1:{free_port()}/neurobank/"
    other = b.ctl("locate", f"{elsewhere}resources/x1/")
    wrong = b.ctl("locate", f"{elsewhere}archives/x1/")
    assert other.returncode == wrong.returncode == 1
    assert all("s3cret" not in p.stdout + p.stderr for p in (other, wrong))


def test_locate_url_with_no_registry_configured_asks_its_own(django_backend: Backend) -> None:
    """With no -r, $NBANK_REGISTRY or configuration, a resource URL is looked up in its
    own registry, as nbank does; a plain id cannot be (exit 1 in both)."""
    b = django_backend
    if Path("/etc/nbankd/config.yaml").exists():
        pytest.skip("this host has a default nbankd configuration")
    id, path = stored_resource(b)
    env = {k: v for k, v in b.env.items() if k != "NBANKD_CONFIG"}
    url = f"{b.url}resources/{id}/"
    ours, theirs = run([NBANKCTL, "locate", url], env), run([NBANK, "locate", url], env)
    assert ours.returncode == theirs.returncode == 0, ours.stderr
    assert ours.stdout.split() == theirs.stdout.split() == [id, str(path)]
    ours, theirs = run([NBANKCTL, "locate", id], env), run([NBANK, "locate", id], env)
    assert (ours.returncode, theirs.returncode) == (2, 1)  # a configuration problem: 2


def test_locate_url_with_no_registry_configured_sends_no_credentials(
    django_backend: Backend,
) -> None:
    """With no registry configured, a URL's host is asked anonymously, even when it asks
    for credentials and ~/.netrc has a "default" entry (which matches every host)."""
    b = django_backend
    seen: list[str | None] = []

    class AskingForCredentials(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            body = b'{"detail": "Authentication credentials were not provided."}'
            self.send_response(403)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AskingForCredentials)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        home = b.tmp / "netrc-home"
        home.mkdir()
        (home / ".netrc").write_text("default login labuser password S3cretDefault\n")
        (home / ".netrc").chmod(0o600)
        env = {k: v for k, v in b.env.items() if k not in ("NBANKD_CONFIG", "NBANK_REGISTRY")}
        env["HOME"] = str(home)
        url = f"http://127.0.0.1:{server.server_address[1]}/neurobank/resources/abc/"
        proc = run([NBANKCTL, "locate", url], env)
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode != 0
    assert seen and seen == [None] * len(seen), seen


def test_locate_a_word_that_is_not_even_a_url_is_an_id(django_backend: Backend) -> None:
    """A word that cannot be parsed as a URL (an unclosed IPv6 bracket) is looked up as an
    identifier, as nbank does; the words after it are still located."""
    b = django_backend
    id, path = stored_resource(b)
    proc = b.ctl("locate", "http://[::1/resources/x/", id)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(path) in proc.stdout


def test_locate_a_url_that_names_no_resource_fails_as_nbank(django_backend: Backend) -> None:
    """A registry URL that is not a resource's is not found (exit 1 in both)."""
    b = django_backend
    url = f"{b.url}archives/x/"
    ours, theirs = b.ctl("locate", url), b.nbank("locate", url)
    assert ours.returncode == theirs.returncode == 1
    assert "(not found)" in ours.stdout and "(not found)" in theirs.stdout


def test_locate_url_json(django_backend: Backend) -> None:
    """--json gives the id the URL names and its locations."""
    b = django_backend
    id, path = stored_resource(b)
    proc = b.ctl("--json", "locate", f"{b.url}resources/{id}/")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["id"] == id and [loc["address"] for loc in doc["locations"]] == [str(path)]


# --- -v, --debug --------------------------------------------------------------------------


def test_dash_v_prints_the_version_as_nbank(tmp_path: Path) -> None:
    """-v before any command prints the program's version and exits 0, as nbank's does."""
    env = base_env(tmp_path / "home")
    ours, theirs = run([NBANKCTL, "-v"], env), run([NBANK, "-v"], env)
    assert ours.returncode == theirs.returncode == 0
    assert ours.stdout.strip() == f"nbankctl {__version__}"
    assert re.fullmatch(r"nbank \S+", theirs.stdout.strip())


def test_dash_v_after_the_command_is_its_verbose_flag(own: Backend) -> None:
    """`check all -v` is check all, verbose: not the version."""
    _, _, [id] = clean_archive(own)
    proc = own.ctl("check", "all", "-v")
    assert proc.returncode == 0 and __version__ not in proc.stdout
    assert re.search(rf"^ - {id} : \S+ - OK$", proc.stderr, re.MULTILINE), proc.stderr


def test_debug_shows_the_registry_requests_as_nbank_runs(tagged: tuple[Backend, str]) -> None:
    """--debug before the command says the registry's requests on stderr; the output
    and status are those without it, and those of nbank --debug."""
    b, tag = tagged
    _, arch = b.archive()
    name = b.resource(b.blob("d"), arch, name=f"{tag}d")
    ours = b.ctl("--debug", "search", tag)
    assert b.url is not None
    theirs = run([NBANK, "-r", b.url, "--debug", "search", tag], b.env)
    assert ours.returncode == theirs.returncode == 0
    assert ours.stdout.split() == theirs.stdout.split() == [name]
    assert f'"GET /neurobank/resources/?name={tag} HTTP/1.1" 200' in ours.stderr, ours.stderr
    assert "debug" not in b.ctl("search", tag).stderr


def test_debug_after_the_command(tagged: tuple[Backend, str]) -> None:
    """--debug is taken after the command too."""
    b, tag = tagged
    proc = b.ctl("search", tag, "--debug")
    assert proc.returncode == 0 and "GET /neurobank/resources/" in proc.stderr


def test_debug_never_prints_credentials(
    tagged: tuple[Backend, str], django_registry: DjangoServer
) -> None:
    """A write with -a user:password under --debug shows its request but neither the
    password nor the Authorization header's value."""
    b, tag = tagged
    _, arch = b.archive()
    name = b.resource(b.blob("w"), arch, name=f"{tag}w")
    user, password = django_registry.auth
    auth = f"{user}:{password}"
    proc = b.ctl("-a", auth, "--debug", "modify", "-k", "x=1", name)
    assert proc.returncode == 0, proc.stderr
    assert f"PATCH /neurobank/resources/{name}/" in proc.stderr
    token = base64.b64encode(auth.encode()).decode()
    assert password not in proc.stderr + proc.stdout and token not in proc.stderr


def test_debug_output_keeps_json_on_stdout(tagged: tuple[Backend, str]) -> None:
    """With --debug and --json, standard output is still JSON alone."""
    b, tag = tagged
    _, arch = b.archive()
    b.resource(b.blob("j"), arch, name=f"{tag}j")
    proc = b.ctl("--debug", "--json", "search", tag)
    assert proc.returncode == 0 and "nbankctl: debug:" in proc.stderr
    assert [r["name"] for r in json_stream(proc.stdout)] == [f"{tag}j"]


def test_embedded_registry_makes_no_request(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """--debug on the embedded registry says the version and command and nothing of HTTP."""
    b = make_backend("embedded", tmp_path, request)
    try:
        proc = b.ctl("--debug", "search", "nothing-matches")
    finally:
        b.registry.close()
    assert proc.returncode == 0, proc.stderr
    assert f"nbankctl {__version__}" in proc.stderr and "command: search" in proc.stderr
    assert "HTTP" not in proc.stderr

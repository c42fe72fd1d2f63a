"""The configuration file (SPEC section 4): parsing, validation, checks, description."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from nbankd import errors
from nbankd.config import (
    ACCEPTED_FORMS,
    ACCEPTED_KEYS,
    Config,
    InvalidConfig,
    Problem,
    check_against_registry,
    check_paths,
    config_problems,
    describe_config,
    find_config_path,
    format_duration,
    load_config,
    parse_config,
    parse_duration,
    prepare_inboxes,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config.example.yaml"

# one archive, one inbox, everything else default
MINIMAL = """\
archives:
  - path: archive
inboxes:
  - path: inbox
    dtype: wav
"""


def inbox(line: str) -> str:
    """MINIMAL with one more line in its inbox."""
    return MINIMAL + f"    {line}\n"


A = "archives: [{path: a}]\n"


def write(tmp_path: Path, text: str, name: str = "nbankd.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text))


def errors_of(tmp_path: Path, text: str) -> list[Problem]:
    return [p for p in config_problems(write(tmp_path, text)) if p.is_error]


# --- durations -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30s", 30.0),
        ("10m", 600.0),
        ("24h", 86400.0),
        ("7d", 604800.0),
        ("1.5h", 5400.0),
        (" 2m ", 120.0),
        ("10M", 600.0),
        ("45", 45.0),
        (90, 90.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
)
def test_duration_forms(value: object, seconds: float) -> None:
    """Each accepted duration form gives its number of seconds."""
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("value", "phrase"),
    [
        ("10 parsecs", "is not a duration"),
        ("1h30m", "is not a duration"),
        ("", "is not a duration"),
        ("-5s", "negative"),
        (-1, "negative"),
        (True, "expected a duration"),
        (None, "expected a duration"),
        ([1], "expected a duration"),
        (float("inf"), "finite"),
    ],
)
def test_duration_garbage(value: object, phrase: str) -> None:
    """Garbage is refused with a message showing the accepted forms."""
    with pytest.raises(ValueError, match=re.escape(phrase)) as caught:
        parse_duration(value)
    assert "30s, 10m, 24h, 7d" in str(caught.value)


@given(st.one_of(st.integers(0, 10**9), st.floats(0, 1e9, allow_nan=False)))
def test_duration_round_trip(seconds: float) -> None:
    """format_duration writes text that parses back to the same number of seconds."""
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize(
    ("seconds", "text"), [(86400, "1d"), (3600, "1h"), (300, "5m"), (90, "90s"), (0, "0s")]
)
def test_duration_formatting(seconds: float, text: str) -> None:
    """format_duration uses the largest unit that divides exactly."""
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("key", "snippet"),
    [
        ("inboxes[0].settle_seconds", "    settle_seconds: soon\n"),
        ("inboxes[0].stall_after", "    stall_after: 1 fortnight\n"),
        ("inboxes[0].rescan_every", "    rescan_every: often\n"),
    ],
)
def test_bad_duration_in_file_names_key(tmp_path: Path, key: str, snippet: str) -> None:
    """A bad duration in the file is reported at its key with the accepted forms."""
    [problem] = errors_of(tmp_path, MINIMAL + snippet)
    assert problem.key == key
    assert ACCEPTED_FORMS in problem.message


# --- bad input, one row per mistake ----------------------------------------------------

BAD_INPUT = [
    # (YAML text, key path, phrase in the message)
    ("state_dirr: /x\n", "state_dirr", "did you mean 'state_dir'"),
    (inbox("setle_seconds: 3"), "inboxes[0].setle_seconds", "did you mean 'settle_seconds'"),
    ("- a\n- b\n", "", "must be a mapping"),
    ("archives: /data\n", "archives", "must be a list"),
    (inbox("recursive: very"), "inboxes[0].recursive", "true or false"),
    (inbox("auto_id: maybe"), "inboxes[0].auto_id", "true, false or null"),
    (inbox("ready: markr"), "inboxes[0].ready", "did you mean 'marker'"),
    (inbox("watch: inotify"), "inboxes[0].watch", "one of auto, poll"),
    (inbox("placement: move"), "inboxes[0].placement", "one of copy, rename"),
    (inbox("directories: dirs"), "inboxes[0].directories", "one of files, resources"),
    (inbox("settle_seconds: -1"), "inboxes[0].settle_seconds", "negative"),
    (inbox("rescan_every: 0"), "inboxes[0].rescan_every", "longer than zero"),
    (inbox("stall_after: 5s"), "inboxes[0].stall_after", "longer than settle_seconds"),
    (inbox("settle_seconds: 2h"), "inboxes[0].settle_seconds", "shorter than stall_after (1h)"),
    (inbox("ignore: '*.tmp'"), "inboxes[0].ignore", "must be a list of glob patterns"),
    (inbox("archive: nope"), "inboxes[0].archive", "no configured archive"),
    (inbox("archive: archve"), "inboxes[0].archive", "did you mean 'archive'"),
    (inbox("path_metadata: '(?P<bird>'"), "inboxes[0].path_metadata", "not a valid regular"),
    (inbox("path_metadata: '^[^/]+/'"), "inboxes[0].path_metadata", "no named group"),
    (inbox("rejected_dir: ../rejected"), "inboxes[0].rejected_dir", "not inside the inbox"),
    (inbox("rejected_dir: /tmp/rejected"), "inboxes[0].rejected_dir", "not inside the inbox"),
    (inbox("rejected_dir: ."), "inboxes[0].rejected_dir", "not inside the inbox"),
    (inbox("rejected_dir: .nbank/x"), "inboxes[0].rejected_dir", "work folder"),
    (inbox("dtype: 'two words'"), "inboxes[0].dtype", "not a registry name"),
    (
        inbox("dtype_by_extension: {tar.gz: x}"),
        "inboxes[0].dtype_by_extension['tar.gz']",
        "single file extension",
    ),
    (
        inbox("dtype_by_extension: {.WAV: a, wav: b}"),
        "inboxes[0].dtype_by_extension.wav",
        "given twice",
    ),
    (inbox("metadata: {day: 2024-01-02}"), "inboxes[0].metadata.day", "quote it"),
    (inbox("metadata: [a, b]"), "inboxes[0].metadata", "must be a mapping"),
    (inbox("dtype: x"), "inboxes[0].dtype", "given twice"),
    (A + "inboxes: [{path: in}]\n", "inboxes[0].dtype", "is required"),
    (A + "inboxes: [{dtype: x}]\n", "inboxes[0].path", "is required"),
    (
        "archives: [{path: a}, {path: b}]\ninboxes: [{path: in, dtype: x}]\n",
        "inboxes[0].archive",
        "several archives",
    ),
    ("inboxes: [{path: in, dtype: x}]\n", "inboxes[0].archive", "no archive is configured"),
    ("archives: [{path: a}, {path: b, name: a}]\n", "archives[1].name", "already used"),
    ("archives: [{path: a}, {path: ./a, name: b}]\n", "archives[1].path", "already configured"),
    ("archives: [{path: a}, {path: a/b}]\n", "archives[1].path", "nested"),
    ("archives: [{path: 'my data'}]\n", "archives[0].name", "folder name"),
    ("archives: [{path: a, name: " + "x" * 33 + "}]\n", "archives[0].name", "longer than 32"),
    ("archives: [{path: a, create: yes please}]\n", "archives[0].create", "true or false"),
    (A + "inboxes: [{path: a/in, dtype: x}]\n", "inboxes[0].path", "inside archive"),
    (
        "archives: [{path: in/a}]\ninboxes: [{path: in, dtype: x}]\n",
        "inboxes[0].path",
        "contains archive",
    ),
    (A + "inboxes: [{path: a, dtype: x}]\n", "inboxes[0].path", "inside archive"),
    (
        A + "inboxes: [{path: in, dtype: x}, {path: in/sub, dtype: x}]\n",
        "inboxes[1].path",
        "overlaps inboxes[0]",
    ),
    (
        A + "inboxes: [{path: in, dtype: x}, {path: in2, dtype: x, settle_seconds: x}]\n",
        "inboxes[1].settle_seconds",
        "is not a duration",
    ),
    (MINIMAL + "state_dir: inbox/state\n", "state_dir", "inside inboxes[0]"),
    (MINIMAL + "control_socket: archive/c.sock\n", "control_socket", "inside archive"),
    ("registry: ftp://host/neurobank/\n", "registry", "must be 'embedded' or the URL"),
    ("registry: Embedded-ish\n", "registry", "must be 'embedded' or the URL"),
    ("registry: https:///neurobank/\n", "registry", "no host"),
    ("registry: https://host/neurobank/?x=1\n", "registry", "query"),
    ("registry: https://bob:s3cret@host/neurobank/\n", "registry", "user name or password"),
    ("registry_url: file:///tmp/x\n", "registry_url", "http(s) URL"),
    (
        "registry: https://a/neurobank/\nregistry_url: https://b/neurobank/\n",
        "registry_url",
        "only applies",
    ),
    ("datatypes: {'bad name': text/plain}\n", "datatypes['bad name']", "not a registry name"),
    ("datatypes: {ok: 12}\n", "datatypes.ok", "content type must be text"),
    ("control: {readers: nbank}\n", "control.readers", "must be a list"),
    ("control: {admins: [root, 0]}\n", "control.admins", "item 1"),
    ("control: {writers: [x]}\n", "control.writers", "unknown key"),
    ("audit: {every: 0}\n", "audit.every", "longer than zero"),
    ("audit: {scrub_days: -1}\n", "audit.scrub_days", "negative"),
    ("audit: {scrub_days: 1.5}\n", "audit.scrub_days", "whole number"),
    ("audit: {max_mb_per_s: fast}\n", "audit.max_mb_per_s", "must be a number"),
    ("audit: {max_mb_per_s: -5}\n", "audit.max_mb_per_s", "negative"),
    ("audit: {workers: 0}\n", "audit.workers", "'auto' or a whole number from 1 to 64"),
    ("audit: {workers: 65}\n", "audit.workers", "from 1 to 64"),
    ("audit: {workers: many}\n", "audit.workers", "'auto' or a whole number"),
    ("log: {level: loud}\n", "log.level", "one of debug, info, warning, error"),
    ("log: {format: xml}\n", "log.format", "one of auto, console, json, journal"),
    ("log: json\n", "log", "must be a mapping"),
    (
        'inboxes: [{path: /srv/i, archive: a, dtype: d, metadata: {note: "x\\0y"}}]\n',
        "inboxes[0].metadata.note",
        "NUL character",
    ),
    ("metrics: {listen: 9464}\n", "metrics.listen", "HOST:PORT as text"),
    ("metrics: {listen: localhost}\n", "metrics.listen", "is not HOST:PORT"),
    ("metrics: {listen: '127.0.0.1:0'}\n", "metrics.listen", "from 1 to 65535"),
    ("metrics: {textfile_every: 0}\n", "metrics.textfile_every", "longer than zero"),
    ("metrics: {port: 9464}\n", "metrics.port", "unknown key"),
    ("state_dir: ~nosuchuser_nbankd/x\n", "state_dir", "no such user"),
    ("state_dir:\n", "state_dir", "empty"),
]


@pytest.mark.parametrize(
    ("text", "key", "phrase"),
    BAD_INPUT,
    ids=[f"{key or 'top'}-{phrase}" for _, key, phrase in BAD_INPUT],
)
def test_bad_input_is_reported_at_its_key(tmp_path: Path, text: str, key: str, phrase: str) -> None:
    """Each mistake is reported with the file, its key path and a telling reason."""
    config_file = write(tmp_path, text)
    config, problems = parse_config(config_file)
    assert config is None
    found = [p for p in problems if p.is_error and p.key == key and phrase in str(p)]
    assert found, "\n".join(map(str, problems))
    assert str(config_file) in str(found[0])


def test_metrics_section(tmp_path: Path) -> None:
    """metrics: an HTTP address (IPv6 in brackets) and a textfile path, made absolute."""
    config = load(tmp_path, "metrics: {listen: '[::1]:9464', textfile: prom/nbankd.prom}\n")
    assert config.metrics.listen == ("::1", 9464)
    assert config.metrics.textfile == tmp_path / "prom" / "nbankd.prom"
    assert load(tmp_path, "{}\n").metrics.listen is None


def test_credentials_in_url_are_never_echoed(tmp_path: Path) -> None:
    """A password in the registry URL is refused without repeating it anywhere."""
    with pytest.raises(errors.ConfigError) as caught:
        load(tmp_path, "registry: https://bob:s3cret@host/neurobank/\n")
    assert "s3cret" not in str(caught.value)
    assert "registry_auth" in str(caught.value)


def test_yaml_syntax_error_gives_line(tmp_path: Path) -> None:
    """A YAML syntax error is reported with its line number."""
    [problem] = config_problems(write(tmp_path, "archives:\n  - path: a\n  bad: [1, 2\n"))
    assert "YAML syntax error" in problem.message
    assert problem.line is not None and f"line {problem.line}" in problem.message


def test_missing_file(tmp_path: Path) -> None:
    """A file that cannot be read is a ConfigError naming it."""
    missing = tmp_path / "nope.yaml"
    with pytest.raises(errors.ConfigError, match="cannot read") as caught:
        load_config(missing)
    assert str(missing) in str(caught.value)


def test_folder_instead_of_file(tmp_path: Path) -> None:
    """A folder given as the configuration file is reported as such."""
    with pytest.raises(errors.ConfigError, match="is a folder"):
        load_config(tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    """An empty file is a problem rather than silently all defaults."""
    with pytest.raises(errors.ConfigError, match="empty"):
        load(tmp_path, "# only a comment\n")


def test_all_problems_are_collected(tmp_path: Path) -> None:
    """load_config reports every problem at once, not only the first."""
    text = "state_dirr: x\nlog: {level: loud}\naudit: {every: never}\n"
    with pytest.raises(InvalidConfig) as caught:
        load(tmp_path, text)
    assert [p.key for p in caught.value.problems] == ["state_dirr", "log.level", "audit.every"]
    for key in ("state_dirr", "log.level", "audit.every"):
        assert key in str(caught.value)


def test_config_error_is_a_usage_error(tmp_path: Path) -> None:
    """The raised error is errors.ConfigError, which exits with status 2."""
    with pytest.raises(errors.ConfigError) as caught:
        load(tmp_path, "bogus: 1\n")
    assert errors.exit_code_for(caught.value) == errors.EXIT_USAGE


def test_problem_text_names_file_line_and_key(tmp_path: Path) -> None:
    """A problem reads file:line: key: reason."""
    config_file = write(tmp_path, MINIMAL + "    ready: later\n")
    [problem] = config_problems(config_file)
    assert str(problem).startswith(f"{config_file}:6: inboxes[0].ready: must be one of")


def test_unknown_archive_key_suggests(tmp_path: Path) -> None:
    """Unknown keys inside list entries get a suggestion too."""
    [problem] = errors_of(tmp_path, "archives: [{path: a, crate: true}]\n")
    assert problem.key == "archives[0].crate"
    assert "did you mean 'create'" in problem.message


def test_invalid_archive_does_not_cascade(tmp_path: Path) -> None:
    """An inbox naming a broken archive entry is not reported a second time."""
    text = "archives: [{path: a, create: maybe}]\ninboxes: [{path: in, dtype: x, archive: a}]\n"
    assert [p.key for p in errors_of(tmp_path, text)] == ["archives[0].create"]


# --- values and defaults ------------------------------------------------------------------


def test_defaults(tmp_path: Path) -> None:
    """A minimal file gets SPEC's defaults everywhere."""
    config = load(tmp_path, MINIMAL)
    assert config.registry == "embedded" and config.embedded
    assert config.registry_url is None and config.registry_auth is None
    assert config.state_dir == Path("/var/lib/nbankd")
    assert config.control_socket == Path("/run/nbankd/control.sock")
    assert config.control.readers == () and config.control.admins == ("root",)
    assert (config.audit.every, config.audit.scrub_days, config.audit.max_mb_per_s) == (
        86400.0,
        30,
        200.0,
    )
    assert (config.log.format, config.log.level) == ("auto", "info")
    [inbox] = config.inboxes
    assert inbox.recursive and inbox.verify and inbox.auto_id is None
    assert inbox.settle_seconds == 10.0
    assert (inbox.stall_after, inbox.rescan_every) == (3600.0, 300.0)
    assert (inbox.ready, inbox.watch, inbox.placement, inbox.directories) == (
        "settle",
        "auto",
        "copy",
        "files",
    )
    assert inbox.ignore == ("*.tmp", "*.part", ".*")
    assert inbox.rejected_dir == "rejected"
    assert config.warnings == ()


def test_relative_paths_resolve_against_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relative paths resolve against the file's folder, not the working directory."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (tmp_path / "etc").mkdir()
    config = load_config(write(tmp_path / "etc", MINIMAL + "state_dir: ../state\n"))
    assert config.state_dir == tmp_path / "state"
    assert config.archives[0].path == tmp_path / "etc" / "archive"
    assert config.inboxes[0].path == tmp_path / "etc" / "inbox"


def test_home_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`~` in a path means the home folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = load(tmp_path, MINIMAL + "registry_auth: ~/.netrc\n")
    assert config.registry_auth == tmp_path / "home" / ".netrc"


def test_paths_are_normalised(tmp_path: Path) -> None:
    """Paths come out absolute with `.` and `..` removed."""
    config = load(tmp_path, "archives: [{path: ./x/../archive/, name: a}]\n")
    assert config.archives[0].path == tmp_path / "archive"


@pytest.mark.parametrize(
    ("written", "normal"),
    [
        ("https://host/neurobank", "https://host/neurobank/"),
        ("https://host/neurobank/", "https://host/neurobank/"),
        ("HTTPS://host:8443/neurobank", "https://host:8443/neurobank/"),
    ],
)
def test_registry_url_normalised(tmp_path: Path, written: str, normal: str) -> None:
    """A registry URL is kept with a trailing slash and a lowercase scheme."""
    config = load(tmp_path, f"registry: {written}\n")
    assert config.registry == normal and not config.embedded


def test_registry_url_for_embedded(tmp_path: Path) -> None:
    """registry_url is accepted with the embedded registry and normalised."""
    config = load(tmp_path, "registry_url: https://data.lab/neurobank\n")
    assert config.registry_url == "https://data.lab/neurobank/"


def test_audit_workers_auto_or_a_number(tmp_path: Path) -> None:
    """audit.workers is 0 (automatic) by default or for 'auto', else the number given."""
    assert load(tmp_path, MINIMAL).audit.workers == 0
    assert load(tmp_path, MINIMAL + "audit: {workers: auto}\n").audit.workers == 0
    config = load(tmp_path, MINIMAL + "audit: {workers: 6}\n")
    assert config.audit.workers == 6
    assert yaml.safe_load(describe_config(config))["audit"]["workers"] == 6


def test_scrub_days_shorter_than_every_warns(tmp_path: Path) -> None:
    """scrub_days shorter than audit.every loads, with a warning at audit.scrub_days saying
    each audit then re-reads everything; scrub_days 0 (off) does not warn."""
    config = load(tmp_path, MINIMAL + "audit: {every: 7d, scrub_days: 3}\n")
    [warning] = config.warnings
    assert warning.key == "audit.scrub_days" and warning.severity == "warning"
    assert "shorter than audit.every (7d)" in str(warning) and "re-reads every" in str(warning)
    assert load(tmp_path, MINIMAL + "audit: {every: 7d, scrub_days: 0}\n").warnings == ()
    assert load(tmp_path, MINIMAL + "audit: {every: 7d, scrub_days: 7}\n").warnings == ()


def test_registry_url_outside_neurobank_warns(tmp_path: Path) -> None:
    """A URL not ending in /neurobank/ loads, with a warning."""
    config = load(tmp_path, "registry: https://host/registry/\n")
    assert [w.key for w in config.warnings] == ["registry"]


def test_extension_keys_normalised(tmp_path: Path) -> None:
    """dtype_by_extension keys become lowercase with a leading dot."""
    text = MINIMAL + "    dtype_by_extension: {WAV: song, .PProx: spikes}\n"
    [inbox] = load(tmp_path, text).inboxes
    assert dict(inbox.dtype_by_extension) == {".wav": "song", ".pprox": "spikes"}
    assert inbox.dtype_for("bird/x.Wav") == "song"
    assert inbox.dtype_for("notes.txt") == "wav"


def test_dtype_optional_with_extensions(tmp_path: Path) -> None:
    """An inbox may omit dtype when dtype_by_extension is given."""
    text = "archives: [{path: a}]\ninboxes: [{path: in, dtype_by_extension: {.wav: song}}]\n"
    [inbox] = load(tmp_path, text).inboxes
    assert inbox.dtype is None and inbox.dtype_for("x.bin") is None


def test_inbox_archive_by_path(tmp_path: Path) -> None:
    """An inbox may name its archive by path."""
    text = "archives: [{path: a, name: one}, {path: b}]\n"
    text += "inboxes: [{path: in, dtype: x, archive: ./b}]\n"
    config = load(tmp_path, text)
    assert config.archive_for(config.inboxes[0]).name == "b"


def test_single_archive_is_the_default(tmp_path: Path) -> None:
    """With one archive, an inbox without 'archive' deposits into it."""
    config = load(tmp_path, MINIMAL)
    assert config.archive_for(config.inboxes[0]) == config.archives[0]


def test_archive_name_defaults_to_folder(tmp_path: Path) -> None:
    """An archive's name defaults to its folder's name."""
    config = load(tmp_path, "archives: [{path: /data/birdsong}]\n")
    assert config.archives[0].name == "birdsong"
    assert config.archives[0].root == "/data/birdsong"


def test_inbox_folders(tmp_path: Path) -> None:
    """work_dir and rejected_path are absolute folders inside the inbox."""
    [inbox] = load(tmp_path, MINIMAL + "    rejected_dir: ./failed//here/\n").inboxes
    assert inbox.work_dir == tmp_path / "inbox" / ".nbank"
    assert inbox.rejected_dir == "failed/here"
    assert inbox.rejected_path == tmp_path / "inbox" / "failed" / "here"


def test_path_metadata_compiled(tmp_path: Path) -> None:
    """path_metadata is a compiled pattern with its named groups."""
    [inbox] = load(tmp_path, MINIMAL + "    path_metadata: '^(?P<bird>[^/]+)/'\n").inboxes
    assert inbox.path_metadata is not None
    assert inbox.path_metadata.match("b12/x.wav")["bird"] == "b12"  # type: ignore[index]


def test_metadata_kept_as_json_values(tmp_path: Path) -> None:
    """Inbox metadata is kept as given, quoted dates as text."""
    text = MINIMAL + "    metadata: {experimenter: dmeliza, day: '2024-01-02', n: [1, 2]}\n"
    [inbox] = load(tmp_path, text).inboxes
    assert dict(inbox.metadata) == {"experimenter": "dmeliza", "day": "2024-01-02", "n": [1, 2]}


def test_verify_false_warns(tmp_path: Path) -> None:
    """verify: false loads but leaves a warning about the risk."""
    config = load(tmp_path, MINIMAL + "    verify: false\n")
    assert config.inboxes[0].verify is False
    [warning] = config.warnings
    assert warning.key == "inboxes[0].verify" and warning.severity == "warning"


def test_enum_values_any_case(tmp_path: Path) -> None:
    """Enumerated values are accepted in any case and stored lowercase."""
    assert load(tmp_path, "log: {level: WARNING}\n").log.level == "warning"


def test_config_is_frozen(tmp_path: Path) -> None:
    """The parsed configuration cannot be changed after loading."""
    config = load(tmp_path, MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.state_dir = Path("/tmp")  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.inboxes[0].metadata["x"] = 1  # type: ignore[index]


def test_accessors(tmp_path: Path) -> None:
    """Helper accessors answer from the parsed values."""
    text = (
        MINIMAL
        + "    dtype_by_extension: {.pprox: spikes}\ndatatypes: {wav: audio/wav, extra: ''}\n"
    )
    config = load(tmp_path, text)
    assert config.datatypes_needed() == {"wav", "spikes", "extra"}
    assert config.content_type_for("wav") == "audio/wav"
    assert config.content_type_for("spikes") == "application/octet-stream"
    assert config.embedded_db_path == Path("/var/lib/nbankd/registry.sqlite3")
    assert config.source == tmp_path / "nbankd.yaml"
    assert config.inbox_containing(tmp_path / "inbox" / "a" / "b.wav") == config.inboxes[0]
    assert config.inbox_containing(tmp_path / "other") is None


# --- finding the file ------------------------------------------------------------------


def test_find_config_cli_first(tmp_path: Path) -> None:
    """-c FILE wins over $NBANKD_CONFIG."""
    found = find_config_path(str(tmp_path / "a.yaml"), {"NBANKD_CONFIG": "/b.yaml"})
    assert found == tmp_path / "a.yaml"


def test_find_config_env_second() -> None:
    """$NBANKD_CONFIG is used without -c."""
    assert find_config_path(None, {"NBANKD_CONFIG": "/b.yaml"}) == Path("/b.yaml")


def test_find_config_default() -> None:
    """Without either, the default path is used."""
    assert find_config_path(None, {}) == Path("/etc/nbankd/config.yaml")


def test_find_config_relative_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative -c FILE becomes absolute against the working directory."""
    monkeypatch.chdir(tmp_path)
    assert find_config_path("c.yaml", {}) == tmp_path / "c.yaml"


# --- describing --------------------------------------------------------------------------


def test_describe_fills_defaults(tmp_path: Path) -> None:
    """The description shows every default explicitly."""
    described = yaml.safe_load(describe_config(load(tmp_path, MINIMAL)))
    assert described["audit"] == {
        "every": "1d",
        "scrub_days": 30,
        "max_mb_per_s": 200,
        "workers": "auto",
    }
    assert described["inboxes"][0]["stall_after"] == "1h"
    assert described["inboxes"][0]["archive"] == "archive"
    assert described["datatypes"] == {"wav": "application/octet-stream"}


def test_describe_round_trips(tmp_path: Path) -> None:
    """The description loads back to an equal configuration."""
    text = MINIMAL + (
        "    dtype_by_extension: {.pprox: spikes}\n"
        "    metadata: {rig: 3, tags: [a, b]}\n"
        "    path_metadata: '^(?P<bird>[^/]+)/'\n"
        "    settle_seconds: 2.5\n"
        "registry: https://host/neurobank/\n"
        "datatypes: {wav: audio/wav}\n"
    )
    config = load(tmp_path, text)
    (tmp_path / "again").mkdir()
    again = load_config(write(tmp_path / "again", describe_config(config)))
    assert dataclasses.replace(again, source=config.source, datatypes=config.datatypes) == config
    assert describe_config(again).splitlines()[1:] == describe_config(config).splitlines()[1:]


def test_describe_has_no_credentials(tmp_path: Path) -> None:
    """The description names the credentials file, never its contents."""
    (tmp_path / "auth").write_text("bob:s3cret\n")
    config = load(tmp_path, "registry: https://host/neurobank/\nregistry_auth: auth\n")
    text = describe_config(config)
    assert "s3cret" not in text and str(tmp_path / "auth") in text


# --- checks that touch the world ------------------------------------------------------------


def test_prepare_inboxes_creates_folders(tmp_path: Path) -> None:
    """Missing inbox and rejected folders are created."""
    config = load(tmp_path, MINIMAL + "    rejected_dir: bad/ones\n")
    assert prepare_inboxes(config) == []
    assert (tmp_path / "inbox" / "bad" / "ones").is_dir()


def test_prepare_inboxes_reports_failure(tmp_path: Path) -> None:
    """An inbox that cannot be created is reported; the others are still made."""
    (tmp_path / "blocked").write_text("a file, not a folder")
    text = "archives: [{path: a}]\ninboxes: [{path: blocked/in, dtype: x}, {path: ok, dtype: x}]\n"
    [problem] = prepare_inboxes(load(tmp_path, text))
    assert problem.key == "inboxes[0].path"
    assert (tmp_path / "ok" / "rejected").is_dir()


def _nbank_json(archive: Path, **policy: Any) -> None:
    archive.mkdir(parents=True, exist_ok=True)
    body = {"registry": "https://host/neurobank/", "policy": {"allow_directories": False, **policy}}
    (archive / "nbank.json").write_text(json.dumps(body))


def test_check_paths_missing_archive_warns(tmp_path: Path) -> None:
    """An archive folder without nbank.json is a warning, not an error."""
    [problem] = check_paths(load(tmp_path, MINIMAL))
    assert problem.key == "archives[0].path" and problem.severity == "warning"


def test_check_paths_create_is_quiet(tmp_path: Path) -> None:
    """With create: true a missing archive is expected."""
    assert check_paths(load(tmp_path, "archives: [{path: a, create: true}]\n")) == []


def test_check_paths_directories_need_policy(tmp_path: Path) -> None:
    """directories: resources needs an archive that allows directories."""
    _nbank_json(tmp_path / "archive")
    config = load(tmp_path, MINIMAL + "    directories: resources\n")
    [problem] = check_paths(config)
    assert problem.key == "inboxes[0].directories" and problem.is_error


def test_check_paths_credentials_file_mode(tmp_path: Path) -> None:
    """A credentials file readable by others is a warning."""
    _nbank_json(tmp_path / "archive")
    auth = tmp_path / "auth"
    auth.write_text("u:p\n")
    auth.chmod(0o644)
    text = MINIMAL + "registry: https://host/neurobank/\nregistry_auth: auth\n"
    [problem] = check_paths(load(tmp_path, text))
    assert problem.key == "registry_auth" and problem.severity == "warning"


# --- the example file --------------------------------------------------------------------


def test_example_is_the_quick_start() -> None:
    """config.example.yaml loads and runs an embedded demo under the checkout."""
    config = load_config(EXAMPLE)
    demo = EXAMPLE.parent / "demo"
    assert config.embedded and config.warnings == ()
    assert config.state_dir == demo / "state"
    assert config.control_socket == demo / "control.sock"
    [archive] = config.archives
    assert (archive.path, archive.name, archive.create) == (demo / "archive", "demo", True)
    [inbox] = config.inboxes
    assert inbox.path == demo / "inbox" and inbox.archive == "demo"
    assert inbox.dtype in config.datatypes
    assert inbox.settle_seconds <= 5


def _commented_keys(text: str) -> set[str]:
    """Keys that appear in the example, written or commented out (`# key:`)."""
    found = set(re.findall(r"^[\s#-]*([a-z_]+):", text, re.MULTILINE))
    found |= set(re.findall(r"[{,]\s*([a-z_]+):", text))  # flow mappings {a: 1, b: 2}
    return found


@pytest.mark.parametrize(
    ("section", "key"), [(s, k) for s, ks in ACCEPTED_KEYS.items() for k in ks]
)
def test_example_documents_every_key(section: str, key: str) -> None:
    """Every key the parser accepts appears in config.example.yaml."""
    assert key in _commented_keys(EXAMPLE.read_text()), f"{section or 'top level'}: {key}"


def test_example_keys_are_all_accepted() -> None:
    """Every key written (not commented) in the example is accepted by the parser."""
    accepted = {k for keys in ACCEPTED_KEYS.values() for k in keys}
    data = yaml.safe_load(EXAMPLE.read_text())
    written = set(data) | {k for entry in data["archives"] + data["inboxes"] for k in entry}
    assert written <= accepted


# --- against a registry -------------------------------------------------------------------


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Any]:
    from nbankd.registry.embedded import EmbeddedRegistry

    reg = EmbeddedRegistry(tmp_path / "state" / "registry.sqlite3")
    try:
        yield reg
    finally:
        reg.close()


HTTP = "registry: https://host/neurobank/\n"


def test_embedded_fresh_registry_is_fine(tmp_path: Path, registry: Any) -> None:
    """With the embedded registry, missing datatypes and archives are not problems."""
    assert check_against_registry(load(tmp_path, MINIMAL), registry) == []


def test_embedded_conflicting_archive(tmp_path: Path, registry: Any) -> None:
    """An archive name registered with another root is a problem even when embedded."""
    registry.add_archive("archive", "neurobank", "/somewhere/else")
    [problem] = check_against_registry(load(tmp_path, MINIMAL), registry)
    assert problem.key == "archives[0].path" and "/somewhere/else" in problem.message


def test_embedded_path_under_other_name(tmp_path: Path, registry: Any) -> None:
    """An archive path registered under another name asks to set that name."""
    registry.add_archive("old-name", "neurobank", str(tmp_path / "archive"))
    [problem] = check_against_registry(load(tmp_path, MINIMAL), registry)
    assert problem.key == "archives[0].name" and "set name: old-name" in problem.hint


def test_http_missing_datatype(tmp_path: Path, registry: Any) -> None:
    """Against django-neurobank, a datatype the registry lacks is reported where it is named."""
    registry.add_archive("archive", "neurobank", str(tmp_path / "archive"))
    problems = check_against_registry(load(tmp_path, MINIMAL + HTTP), registry)
    assert [p.key for p in problems if p.is_error] == ["inboxes[0].dtype"]
    assert "nbankctl dtype add wav" in problems[0].hint


def test_http_unregistered_archive(tmp_path: Path, registry: Any) -> None:
    """Against django-neurobank, an unregistered archive without create: true is reported."""
    registry.add_datatype("wav")
    problems = check_against_registry(load(tmp_path, MINIMAL + HTTP), registry)
    assert [p.key for p in problems if p.is_error] == ["archives[0]"]


def test_http_create_true_may_be_unregistered(tmp_path: Path, registry: Any) -> None:
    """An archive with create: true is registered at start, so its absence is fine."""
    registry.add_datatype("wav")
    text = HTTP + "archives: [{path: a, create: true}]\ninboxes: [{path: in, dtype: wav}]\n"
    assert [p for p in check_against_registry(load(tmp_path, text), registry) if p.is_error] == []


def test_http_all_registered(tmp_path: Path, registry: Any) -> None:
    """A registry holding every datatype and archive gives no errors."""
    registry.add_datatype("wav")
    registry.add_archive("archive", "neurobank", str(tmp_path / "archive"))
    problems = check_against_registry(load(tmp_path, MINIMAL + HTTP), registry)
    assert [p for p in problems if p.is_error] == []


class _Unreachable:
    url = "https://host/neurobank/"
    backend = "http"

    def info(self) -> dict[str, Any]:
        raise errors.RegistryUnavailable("connection refused")


def test_unreachable_registry(tmp_path: Path) -> None:
    """An unreachable registry is one problem, not an exception."""
    [problem] = check_against_registry(load(tmp_path, MINIMAL + HTTP), _Unreachable())  # type: ignore[arg-type]
    assert problem.key == "registry" and "cannot reach" in problem.message


class _RefusesCredentials:
    """Answers reads like an empty registry holding everything; refuses the credentials."""

    url = "https://host/neurobank/"
    backend = "http"

    def __init__(self, root: Path) -> None:
        self.root = root

    def info(self) -> dict[str, Any]:
        return {"name": "django-neurobank", "api_version": "1.2"}

    def list_datatypes(self) -> list[Any]:
        from nbankd.registry.base import DataType

        return [DataType("wav")]

    def get_archive(self, name: str) -> Any:
        from nbankd.registry.base import ArchiveRecord

        return ArchiveRecord(name, "neurobank", str(self.root))

    def check_credentials(self) -> None:
        raise errors.RegistryAuthError("Invalid username/password.")


def test_refused_credentials(tmp_path: Path) -> None:
    """Credentials the registry refuses are reported against registry_auth."""
    fake = _RefusesCredentials(tmp_path / "archive")
    [problem] = check_against_registry(load(tmp_path, MINIMAL + HTTP), fake)  # type: ignore[arg-type]
    assert problem.key == "registry_auth" and "refused" in problem.message


def test_example_env_var_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """$NBANKD_CONFIG can point at the example file and it loads."""
    monkeypatch.setenv("NBANKD_CONFIG", str(EXAMPLE))
    assert load_config(find_config_path(None)).source == EXAMPLE
    assert os.path.isabs(find_config_path(None))


def test_unreachable_registry_has_its_code(tmp_path: Path) -> None:
    """An unreachable registry's problem carries the transient error's code."""
    [problem] = check_against_registry(load(tmp_path, MINIMAL + HTTP), _Unreachable())  # type: ignore[arg-type]
    assert problem.code == errors.RegistryUnavailable.code


# --- reading hostile files and overlaps the filesystem hides -------------------------


def test_a_reload_keeps_the_running_state_dir_and_control_socket(tmp_path: Path) -> None:
    """A running daemon re-reading a file that moves state_dir or control_socket keeps
    its own (they change at restart), with a warning naming the key."""
    running = load(tmp_path, MINIMAL)
    moved = write(tmp_path, MINIMAL + "state_dir: elsewhere\ncontrol_socket: other.sock\n")
    reloaded = load_config(moved, running=running)
    assert (reloaded.state_dir, reloaded.control_socket) == (
        running.state_dir,
        running.control_socket,
    )
    said = {p.key: p.message for p in reloaded.warnings}
    assert (
        "at the next restart" in said["state_dir"]
        and "at the next restart" in said["control_socket"]
    )
    assert load_config(moved).state_dir == tmp_path / "elsewhere"  # a start takes the file's


def test_files_the_daemon_uses_may_not_be_in_an_inbox(tmp_path: Path) -> None:
    """The metrics textfile, the credentials and the configuration itself would be
    deposited from an inbox; the textfile would be a stray file in an archive."""
    text = MINIMAL + "metrics: {textfile: inbox/nbankd.prom}\nregistry_auth: inbox/auth\n"
    keys = {p.key for p in errors_of(tmp_path, text)}
    assert {"metrics.textfile", "registry_auth"} <= keys
    keys = {p.key for p in errors_of(tmp_path, MINIMAL + "metrics: {textfile: archive/x.prom}\n")}
    assert keys == {"metrics.textfile"}
    (tmp_path / "rig").mkdir()
    nested = write(
        tmp_path / "rig", "archives: [{path: ../archive}]\ninboxes: [{path: ., dtype: wav}]\n"
    )
    [err] = [p for p in config_problems(nested) if p.is_error]
    assert err.key == "inboxes[0].path" and "configuration file" in err.message


def test_an_archive_reached_through_a_link_is_the_same_archive(tmp_path: Path) -> None:
    """A second archive entry that is the first one through a symbolic link is refused
    where the filesystem is looked at (the daemon, check-config)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").symlink_to(tmp_path / "a")
    path = write(tmp_path, "archives: [{path: a}, {path: b, name: b}]\n")
    [err] = [p for p in parse_config(path, filesystem=True)[1] if p.is_error]
    assert err.key == "archives[1].path" and "symbolic links" in err.message


def test_other_readers_of_the_configuration_never_look_up_its_folders(tmp_path: Path) -> None:
    """Commands that only read the file (every nbankctl command) compare folders as
    written: a hung network mount named in it cannot hang them."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").symlink_to(tmp_path / "a")
    path = write(tmp_path, "archives: [{path: a}, {path: b, name: b}]\n")
    assert [p for p in parse_config(path)[1] if p.is_error] == []


@pytest.mark.parametrize(
    ("written", "key"),
    [
        ("audit: {every: 36501d}", "audit.every"),
        ("alerts: {check_every: 100000000000000}", "alerts.check_every"),
        ("audit: {scrub_days: 100000000000000000000}", "audit.scrub_days"),
        ("audit: {max_mb_per_s: " + "9" * 400 + "}", "audit.max_mb_per_s"),
        ("metrics: {textfile_every: " + "9" * 400 + "}", "metrics.textfile_every"),
    ],
)
def test_durations_and_counts_too_large_for_a_timer_are_refused(
    tmp_path: Path, written: str, key: str
) -> None:
    """Past 100 years (threads' timers overflow near 292) a value is a problem naming
    its key, never an OverflowError in a thread later."""
    [err] = errors_of(tmp_path, MINIMAL + written + "\n")
    assert err.key == key


def test_a_group_writable_configuration_is_reported(tmp_path: Path) -> None:
    """Writable by a group other than root's or the owner's own: a warning with the chmod."""
    if os.geteuid() != 0:
        pytest.skip("gives the file to group root")
    config = write(tmp_path, MINIMAL)
    os.chown(config, os.getuid(), 0)
    config.chmod(0o664)
    assert not [p for p in config_problems(config) if "writable" in p.message]
    config.chmod(0o646)
    [warning] = [p for p in config_problems(config) if "writable" in p.message]
    assert warning.severity == "warning" and f"chmod go-w {config}" in warning.hint


def test_a_credentials_file_that_is_not_a_regular_file_is_an_error(tmp_path: Path) -> None:
    """check_paths names registry_auth when it is a FIFO (reading it would block)."""
    os.mkfifo(tmp_path / "auth")
    config = load(tmp_path, MINIMAL + "registry_auth: auth\n")
    [err] = [p for p in check_paths(config) if p.is_error]
    assert err.key == "registry_auth" and "FIFO" in err.message
    with pytest.raises(errors.ConfigError, match="FIFO"):
        from nbankd.registry.credentials import load_file

        load_file(tmp_path / "auth", "registry.example.org")


def test_a_merged_key_with_an_error_is_reported_at_the_anchor(tmp_path: Path) -> None:
    """A bad value a merge brings in names the merging inbox and the anchor's line."""
    text = """\
    archives: [{path: a}]
    inboxes:
      - &rig
        path: rig1
        dtype: wav
        settle_seconds: soon
      - <<: *rig
        path: rig2
    """
    found = {(p.key, p.line) for p in errors_of(tmp_path, text)}
    assert found == {("inboxes[0].settle_seconds", 6), ("inboxes[1].settle_seconds", 6)}

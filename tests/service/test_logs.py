"""Logging set-up: format choice, JSON lines, redaction, stdlib routing, journal fields."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from nbankd.errors import ConfigError
from nbankd.service.logs import (
    configure_logging,
    get_logger,
    journal_fields,
    journal_stream_matches,
    redact_secrets,
    redact_text,
    reset_logging,
    resolve_format,
)

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


@pytest.fixture(autouse=True)
def _restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    yield
    reset_logging()


def _json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def _file_id(fd: int) -> str:
    st = os.fstat(fd)
    return f"{st.st_dev}:{st.st_ino}"


# --- JSON lines ------------------------------------------------------------------------


def test_json_line_has_event_level_timestamp_and_fields() -> None:
    """A JSON line holds the event, level, an ISO UTC timestamp and the bound fields."""
    out = io.StringIO()
    configure_logging("json", "info", out)
    get_logger(inbox="/srv/inbox/rig3").info("deposited", resource_id="a1b2c3d4", size=12)
    (line,) = _json_lines(out)
    assert line["event"] == "deposited"
    assert line["level"] == "info"
    assert line["inbox"] == "/srv/inbox/rig3"
    assert line["resource_id"] == "a1b2c3d4"
    assert line["size"] == 12
    assert ISO_UTC.match(str(line["timestamp"]))


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_a_file_name_that_is_not_utf8_is_logged_escaped(fmt: str) -> None:
    """A source name with undecodable bytes (surrogates) is written escaped to a strict
    UTF-8 stream, never raising; valid non-ASCII text is kept as it is."""
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="utf-8", errors="strict", write_through=True)
    configure_logging(fmt, "info", out)
    get_logger().info("rejected", source="bad\udcff.wav", inbox="/srv/inbox/Zoë")
    text = raw.getvalue().decode("utf-8")
    if fmt == "json":
        (line,) = [json.loads(t) for t in text.splitlines()]
        text = f"{line['source']} {line['inbox']}"
    assert "bad\\udcff.wav" in text and "Zoë" in text


def test_one_line_per_event() -> None:
    """Each event is exactly one line, even with a newline in a value."""
    out = io.StringIO()
    configure_logging("json", "info", out)
    log = get_logger()
    log.info("first", note="two\nlines")
    log.warning("second")
    assert [e["event"] for e in _json_lines(out)] == ["first", "second"]


def test_level_filters_lower_events() -> None:
    """Events below the configured level are not written."""
    out = io.StringIO()
    configure_logging("json", "warning", out)
    log = get_logger()
    log.info("quiet")
    log.debug("quieter")
    log.error("loud")
    assert [e["event"] for e in _json_lines(out)] == ["loud"]


def test_exception_is_rendered_in_json() -> None:
    """log.exception() records level error and the traceback text."""
    out = io.StringIO()
    configure_logging("json", "info", out)
    try:
        raise RuntimeError("disk on fire")
    except RuntimeError:
        get_logger().exception("copy failed")
    (line,) = _json_lines(out)
    assert line["level"] == "error"
    assert "RuntimeError: disk on fire" in str(line["exception"])


def test_logger_made_before_configure_follows_it() -> None:
    """A logger created at import time uses the configuration in force when it logs."""
    early = get_logger(item="a.wav")
    out = io.StringIO()
    configure_logging("json", "info", out)
    early.info("claimed")
    assert _json_lines(out)[0]["item"] == "a.wav"


def test_reconfigure_replaces_output() -> None:
    """Calling configure_logging again (reload) switches the output and level."""
    first, second = io.StringIO(), io.StringIO()
    configure_logging("json", "info", first)
    configure_logging("json", "debug", second)
    get_logger().debug("after reload")
    assert first.getvalue() == ""
    assert _json_lines(second)[0]["event"] == "after reload"


def test_priority_prefix_when_stdout_is_the_journal_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JSON lines get a <N> priority prefix when the stream is $JOURNAL_STREAM."""
    with open(tmp_path / "journal-stream", "w+") as out:
        monkeypatch.setenv("JOURNAL_STREAM", _file_id(out.fileno()))
        assert configure_logging("json", "info", out) == "json"
        log = get_logger()
        log.info("fine")
        log.error("bad")
        out.seek(0)
        lines = out.read().splitlines()
    assert lines[0].startswith("<6>{")
    assert lines[1].startswith("<3>{")
    assert json.loads(lines[1][3:])["event"] == "bad"


# --- console -------------------------------------------------------------------------


def test_console_rendering() -> None:
    """The console format renders the level, event and fields in one readable line."""
    out = io.StringIO()
    configure_logging("console", "info", out)
    get_logger().warning("archive unmounted", archive="birdsong")
    text = out.getvalue()
    assert "archive unmounted" in text
    assert "archive=birdsong" in text
    assert "warning" in text


# --- choosing the format ---------------------------------------------------------------


def test_auto_is_json_on_a_pipe() -> None:
    """auto resolves to json when the stream is not a terminal."""
    assert configure_logging("auto", "info", io.StringIO()) == "json"


def test_auto_is_console_on_a_tty() -> None:
    """auto resolves to console when the stream is a terminal (a real pty)."""
    controller, terminal = os.openpty()
    try:
        with open(terminal, "w", closefd=False) as tty:
            assert configure_logging("auto", "info", tty) == "console"
    finally:
        os.close(controller)
        os.close(terminal)


def test_auto_picks_journal_under_journal_stream(tmp_path: Path) -> None:
    """auto is journal when JOURNAL_STREAM names stdout/stderr and journald's socket is
    there."""
    with open(tmp_path / "stream", "w") as stream:
        env = {"JOURNAL_STREAM": _file_id(stream.fileno())}
        fds = [stream.fileno()]
        assert resolve_format("auto", stream, environ=env, have_journal=True, fds=fds) == (
            "journal"
        )
        assert resolve_format("auto", stream, environ=env, have_journal=False, fds=fds) == ("json")


def test_auto_ignores_inherited_journal_stream(tmp_path: Path) -> None:
    """A JOURNAL_STREAM naming some other file (inherited, output redirected) is ignored."""
    with open(tmp_path / "other", "w") as other, open(tmp_path / "stream", "w") as stream:
        env = {"JOURNAL_STREAM": _file_id(other.fileno())}
        got = resolve_format("auto", stream, environ=env, have_journal=True, fds=[stream.fileno()])
    assert got == "json"


@pytest.mark.parametrize("value", [None, "", "junk", "1:", ":2", "1:2:3"])
def test_journal_stream_malformed(value: str | None) -> None:
    """A missing or malformed JOURNAL_STREAM never matches."""
    assert journal_stream_matches(value, [0, 1, 2]) is False


def test_unknown_format_is_a_config_error() -> None:
    """An unknown log.format names the key and the accepted values."""
    with pytest.raises(ConfigError, match=r"log\.format: 'xml'.*auto, journal, json, console"):
        configure_logging("xml", "info", io.StringIO())


def test_unknown_level_is_a_config_error() -> None:
    """An unknown log.level names the key and the accepted values."""
    with pytest.raises(ConfigError, match=r"log\.level: 'verbose'"):
        configure_logging("json", "verbose", io.StringIO())


# --- redaction -------------------------------------------------------------------------


def test_redaction_in_json_output() -> None:
    """password=, Authorization and URL passwords never reach the output."""
    out = io.StringIO()
    configure_logging("json", "debug", out)
    log = get_logger()
    log.info("login", password="secret")
    log.info("headers", headers={"Authorization": "Basic secret"})
    log.info("registry", url="http://user:secret@host/neurobank/")
    log.info("text password=secret and Authorization: Bearer secret")
    log.info("connecting to https://dmeliza:secret@registry.example/neurobank/")
    text = out.getvalue()
    assert "secret" not in text
    assert "http://user:[redacted]@host/neurobank/" in text
    assert len(_json_lines(out)) == 5


def test_redaction_in_tracebacks() -> None:
    """A secret inside an exception message is hidden in the rendered traceback."""
    out = io.StringIO()
    configure_logging("json", "info", out)
    try:
        raise ConnectionError("cannot reach http://u:secret@registry/")
    except ConnectionError as err:
        get_logger().exception("registry down", error=err)
    assert "secret" not in out.getvalue()
    assert "registry down" in out.getvalue()


@pytest.mark.parametrize(
    "key",
    ["password", "registry_auth", "Authorization", "credentials", "token", "api_key", "passwd"],
)
def test_secret_keys_are_redacted(key: str) -> None:
    """Any key named like a password, auth, credentials or token is replaced whole."""
    event = redact_secrets(None, "info", {"event": "x", key: "hunter2", "user": "dmeliza"})
    assert event[key] == "[redacted]"
    assert event["user"] == "dmeliza"


def test_booleans_under_secret_keys_stay() -> None:
    """A boolean cannot hold a secret, so authorized=True stays readable."""
    event = redact_secrets(None, "info", {"event": "x", "authorized": True, "token": None})
    assert event == {"event": "x", "authorized": True, "token": None}


def test_redaction_looks_into_nested_values() -> None:
    """Secrets in nested mappings and lists are hidden too."""
    event = redact_secrets(
        None,
        "info",
        {"event": "x", "cfg": {"registry": {"password": "p"}, "urls": ["ftp://a:b@c/"]}},
    )
    assert event["cfg"] == {
        "registry": {"password": "[redacted]"},
        "urls": ["ftp://a:[redacted]@c/"],
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://host/path", "http://host/path"),
        ("http://user@host/", "http://user@host/"),
        ("https://u:p%40ss@h:8000/x", "https://u:[redacted]@h:8000/x"),
        ("password=abc def", "password=[redacted] def"),
        ("token: abc", "token: [redacted]"),
        ("{'Authorization': 'Basic dXNlcjpwYXNz'}", "{'Authorization': '[redacted]'}"),
        ("3 files passed", "3 files passed"),
    ],
)
def test_redact_text(text: str, expected: str) -> None:
    """Free text keeps its meaning with only the secret part replaced."""
    assert redact_text(text) == expected


def test_redaction_processor_keeps_other_fields() -> None:
    """capture_logs sees bound fields as given; the redaction processor leaves them intact."""
    with capture_logs() as logs:
        get_logger(inbox="/srv/inbox/rig3", item="a.wav").info("claimed", size=3)
    (entry,) = logs
    assert redact_secrets(None, "info", dict(entry)) == entry


# --- the standard logging module -------------------------------------------------------


def test_stdlib_warnings_go_to_the_same_output() -> None:
    """Stdlib records at warning and above are rendered as JSON lines with their logger."""
    out = io.StringIO()
    configure_logging("json", "debug", out)
    logging.getLogger("urllib3.connectionpool").warning("Retrying %s", "GET /", exc_info=False)
    logging.getLogger("watchdog.observers").info("not shown")
    (line,) = _json_lines(out)
    assert line["event"] == "Retrying GET /"
    assert line["logger"] == "urllib3.connectionpool"
    assert line["level"] == "warning"


def test_stdlib_records_are_redacted() -> None:
    """Secrets in stdlib log messages are hidden as well."""
    out = io.StringIO()
    configure_logging("json", "info", out)
    logging.getLogger("urllib3").error("to http://u:secret@h/ failed")
    assert "secret" not in out.getvalue()


def test_stdlib_custom_level_maps_down() -> None:
    """A custom stdlib level (e.g. 35) is shown at the standard level below it."""
    out = io.StringIO()
    configure_logging("json", "info", out)
    logging.getLogger("lib").log(35, "custom")
    assert _json_lines(out)[0]["level"] == "warning"


def test_reconfigure_keeps_one_bridge() -> None:
    """Configuring twice does not duplicate stdlib records."""
    out = io.StringIO()
    configure_logging("json", "info", io.StringIO())
    configure_logging("json", "info", out)
    logging.getLogger("lib").warning("once")
    assert len(_json_lines(out)) == 1


# --- journal fields ----------------------------------------------------------------------


def test_journal_fields_mapping() -> None:
    """Bound fields map to NBANK_* journal fields; MESSAGE, PRIORITY and identifier are set."""
    fields = journal_fields(
        {
            "event": "deposited",
            "level": "info",
            "timestamp": "2024-01-01T00:00:00Z",
            "resource_id": "a1b2c3d4",
            "inbox": "/srv/inbox/rig3",
            "item": "bird1/a.wav",
            "size": 1024,
            "verified": True,
            "sha1": None,
            "metadata": {"rig": "rig3"},
            "http-status": 503,
            "_record": object(),
        }
    )
    assert fields == {
        "MESSAGE": "deposited",
        "PRIORITY": "6",
        "SYSLOG_IDENTIFIER": "nbankd",
        "NBANK_RESOURCE_ID": "a1b2c3d4",
        "NBANK_INBOX": "/srv/inbox/rig3",
        "NBANK_ITEM": "bird1/a.wav",
        "NBANK_SIZE": "1024",
        "NBANK_VERIFIED": "true",
        "NBANK_METADATA": '{"rig": "rig3"}',
        "NBANK_HTTP_STATUS": "503",
    }


@pytest.mark.parametrize(
    ("level", "priority"),
    [
        ("debug", "7"),
        ("info", "6"),
        ("warning", "4"),
        ("warn", "4"),
        ("error", "3"),
        ("exception", "3"),
        ("critical", "2"),
    ],
)
def test_journal_priority_from_level(level: str, priority: str) -> None:
    """PRIORITY follows syslog: debug 7, info 6, warning 4, error 3, critical 2."""
    assert journal_fields({"event": "x", "level": level})["PRIORITY"] == priority


def test_journal_message_carries_traceback_and_callsite() -> None:
    """The traceback is appended to MESSAGE and callsite keys become CODE_* fields."""
    fields = journal_fields(
        {
            "event": "copy failed",
            "level": "error",
            "exception": "Traceback ...\nOSError: EIO",
            "pathname": "/x/deposit.py",
            "lineno": 12,
            "func_name": "publish",
        }
    )
    assert fields["MESSAGE"] == "copy failed\nTraceback ...\nOSError: EIO"
    assert fields["CODE_FILE"] == "/x/deposit.py"
    assert fields["CODE_LINE"] == "12"
    assert fields["CODE_FUNC"] == "publish"


def test_journal_fields_cannot_override_trusted_fields() -> None:
    """A bound 'message' or 'priority' key is namespaced, never replacing journald's own."""
    fields = journal_fields({"event": "x", "level": "info", "message": "m", "priority": 0})
    assert fields["MESSAGE"] == "x"
    assert fields["PRIORITY"] == "6"
    assert fields["NBANK_MESSAGE"] == "m"
    assert fields["NBANK_PRIORITY"] == "0"


def test_structlog_default_config_is_restored() -> None:
    """reset_logging() leaves structlog on its defaults (so tests do not leak config)."""
    configure_logging("json", "info", io.StringIO())
    reset_logging()
    assert structlog.is_configured() is False

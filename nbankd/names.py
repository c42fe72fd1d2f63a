"""The names nbankd gives and recognises in an inbox folder: the one home of each.

- :data:`WORK_DIR_NAME`: the daemon's work folder, where claimed inputs wait;
- :data:`PROBE_PREFIX`: how a file made there for a moment (and removed) starts;
- :data:`CANARY_NAME`: the file rewritten to prove an inotify watch alive;
- :data:`SIDECAR_SUFFIXES`: ``NAME.nbank.yaml`` / ``NAME.nbank.json`` belong to ``NAME``;
- :data:`MARKER_SUFFIX`: ``NAME.done`` says ``NAME`` is finished (``ready: marker``);
- :data:`REASON_SUFFIX`: ``NAME.reason`` beside a rejected input says why;
- :func:`printable`: how any name found in an inbox is shown in one line;
- :func:`without_controls`: a message that quotes names already, made safe to show;
- :func:`lines_without_controls`: the same for a message of several lines;
- :func:`utf8_text`: text quoting such a name, made valid UTF-8 and otherwise kept;
- :func:`is_utf8`: whether a name (of a file, a tar member, a record) is UTF-8 text.
"""

from __future__ import annotations

WORK_DIR_NAME = ".nbank"
#: how the name of a file made in a work folder for a moment and removed at once
#: starts: ``nbankctl deposit`` asks the kernel about it
#: (:func:`nbankd.deposit.manual.calibrate`), the daemon links it into the archive to
#: prove ``placement: rename`` (:func:`nbankd.daemon.setup.check_placement`), as
#: ``nbankctl deposit`` does before moving files in place
#: (:func:`nbankd.deposit.manual.placement_for`)
PROBE_PREFIX = ".nbankctl-probe-"
#: how the journal key of a manual deposit's "inbox" starts (nbankctl deposit)
MANUAL_INBOX_PREFIX = "manual:"
CANARY_NAME = ".nbankd-canary"
SIDECAR_SUFFIXES = (".nbank.yaml", ".nbank.json")
MARKER_SUFFIX = ".done"
REASON_SUFFIX = ".reason"


def printable(relpath: str) -> str:
    """A one-line, valid-UTF-8 rendering of a relpath for logs and messages.

    Undecodable bytes and control characters (newline, tab, ...) become ``\\xNN``,
    C1 controls, bidirectional overrides and Unicode's line and paragraph separators
    (U+2028, U+2029) ``\\uNNNN``, and a backslash becomes two,
    so the result is unambiguous, never spans lines and displays as the name it is.
    """
    return _escaped(relpath, backslash=True)


def without_controls(text: str) -> str:
    """``text`` as :func:`printable` shows it, except that a backslash stays one: for a
    message that already quotes its names (through :func:`printable`, or as shell words
    to paste, ``$'\\x1b'``), which a second :func:`printable` would garble, while text it
    quotes otherwise (a registry's) may still hold a terminal's escapes. It leaves
    :func:`printable`'s results as they are."""
    return _escaped(text, backslash=False)


def lines_without_controls(text: str) -> str:
    """``text`` as :func:`without_controls` shows it, except that its newlines and tabs
    stay: for a message of several lines by design (an error listing problems, one a
    line) that may quote a registry's text or a file's name. Every other control
    character (ESC, CR, BEL, DEL, C1, a direction override) and undecodable byte is
    shown as text, so nothing in it reaches a terminal as a command."""
    return _escaped(text, backslash=False, keep="\n\t")


def _escaped(text: str, *, backslash: bool, keep: str = "") -> str:
    out = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, as surrogateescape keeps it
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch in keep:
            out.append(ch)
        elif ch == "\\" and backslash:
            out.append("\\\\")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif 0x80 <= code <= 0x9F or code in _BIDI_CONTROLS or code in _LINE_SEPARATORS:
            # C1 (0x9b starts an escape), direction overrides, Unicode's line breaks
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


#: Unicode's bidirectional controls: a name holding one can display as another name
_BIDI_CONTROLS = frozenset({0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)})
#: Unicode's line and paragraph separators: shown raw, a name could span lines
_LINE_SEPARATORS = frozenset({0x2028, 0x2029})


def is_utf8(name: str) -> bool:
    """Whether ``name`` is UTF-8 text: not a file name's undecodable bytes, which Python
    keeps as surrogates (no record is named so, no folder hash covers it, and SQLite
    cannot hold it as text)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def utf8_text(text: str) -> str:
    """``text`` as valid UTF-8: the undecodable bytes of a file name it quotes
    (surrogates) become ``\\udcNN``, nothing else changes (unlike :func:`printable`)."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


__all__ = [
    "CANARY_NAME",
    "MARKER_SUFFIX",
    "PROBE_PREFIX",
    "REASON_SUFFIX",
    "SIDECAR_SUFFIXES",
    "WORK_DIR_NAME",
    "lines_without_controls",
    "printable",
    "utf8_text",
    "without_controls",
]

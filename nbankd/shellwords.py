"""Commands a user can paste: shell quoting for any file name, and the requeue command.

A name may hold spaces, quotes, newlines or bytes that are not UTF-8. Plain names
are quoted as POSIX shells do (``'my file.wav'``); a name with control characters
or undecodable bytes uses bash's ``$'...'`` form with ``\\xNN`` escapes, which bash
and zsh read back to the exact bytes.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from nbankd.config.model import DEFAULT_CONFIG_PATH


def quote(word: str | os.PathLike[str]) -> str:
    """``word`` quoted for a shell, whatever bytes its name holds."""
    text = os.fspath(word)
    if text.isprintable() and not any(0xDC80 <= ord(c) <= 0xDCFF for c in text):
        return shlex.quote(text)
    out = []
    for byte in os.fsencode(text):
        ch = chr(byte)
        if byte < 0x20 or byte >= 0x7F or ch in "\\'":
            out.append(f"\\x{byte:02x}")
        else:
            out.append(ch)
    return "$'" + "".join(out) + "'"


def requeue_command(rejected: str | os.PathLike[str], config: Path | None) -> str:
    """``nbankctl [-c CONFIG] requeue PATH``: ``-c`` unless the daemon reads the
    default configuration file."""
    words = ["nbankctl"]
    if config is not None and Path(config) != DEFAULT_CONFIG_PATH:
        words += ["-c", quote(config)]
    return " ".join([*words, "requeue", quote(rejected)])

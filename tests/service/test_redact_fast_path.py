"""redact_text returns ASCII text holding no sign of a secret as it is, without its
three patterns: the answer is the patterns' own, whatever the text."""

from __future__ import annotations

import random
import string

import pytest

from nbankd.service import redaction
from nbankd.service.redaction import REDACTED, redact_text


def _patterns(text: str) -> str:
    """The three substitutions alone, as redact_text made them before the fast path."""
    text = redaction._URL_USERINFO.sub(lambda m: f"{m['head']}:{REDACTED}@", text)
    text = redaction._AUTH_HEADER.sub(lambda m: f"{m['head']}{REDACTED}", text)
    return redaction._INLINE_SECRET.sub(lambda m: f"{m['head']}{REDACTED}", text)


_PIECES = [
    "https://", "user", ":", "pw", "@", "host/", "Authorization", ": ", "Basic ", "abc",
    "PASSWORD", "passwd", "pwd", "=", "'", "TOKEN", "Secret", "API-key", "api_key",
    "Passphrase", " ", "/var/tmp/inbox/", "x.dat", "proxy-", "ſ", "K", "é", "\"",
]  # fmt: skip


@pytest.mark.parametrize("seed", range(20))
def test_random_texts_are_redacted_as_the_patterns_do(seed: int) -> None:
    """Random texts of secret-like and plain pieces: the same answer as the patterns."""
    rng = random.Random(seed)
    for _ in range(500):
        text = "".join(rng.choice(_PIECES) for _ in range(rng.randint(1, 12)))
        assert redact_text(text) == _patterns(text), text


@pytest.mark.parametrize(
    "text",
    [
        "pa\u017f\u017fword=hunter2",  # long s: case-folds to s under IGNORECASE
        "\u212aey: api\u212aey=x",  # Kelvin sign
        "https://u:p\u00e9@host",
    ],
)
def test_non_ascii_texts_take_the_patterns(text: str) -> None:
    """A text that is not ASCII always goes through the patterns."""
    assert redact_text(text) == _patterns(text)


@pytest.mark.parametrize(
    "text",
    [
        "https://alice:s3cr3t@example.org/x",
        "Proxy-Authorization: Basic Zm9vOmJhcg==",
        "passwd=x pwd: y passphrase='z' token=t secret:s APIKEY=k api-key=k",
    ],
)
def test_each_kind_of_secret_is_hidden(text: str) -> None:
    """Each kind the patterns know is found by the fast path's signs and hidden."""
    assert redact_text(text) == _patterns(text) != text


def test_plain_ascii_text_comes_back_as_it_is() -> None:
    """A path with no sign of a secret is returned unchanged (the very object)."""
    text = "/var/tmp/inbox/rig-3/2026-12-06/" + string.ascii_letters
    assert redact_text(text) is text

"""How a step's error is judged, by table (one errno table for every layer)."""

from __future__ import annotations

import errno
import random

import pytest

from nbankd import errors
from nbankd.deposit import policy
from nbankd.deposit.lifecycle import Kind, Outcome, Progress, State, Step, advance
from nbankd.deposit.outcomes import outcome_for

TABLE = [
    ("bad sidecar", policy.PolicyError("bad-sidecar", "m"), Kind.PERMANENT, "bad-sidecar"),
    ("wrong credentials", errors.RegistryAuthError("m"), Kind.TRANSIENT, "auth"),
    ("unregistered archive", errors.UnknownArchive("m"), Kind.TRANSIENT, "unknown-archive"),
    ("archive unmounted", errors.ArchiveUnavailable("m"), Kind.TRANSIENT, "archive-unavailable"),
    ("name taken", errors.NameTaken("m"), Kind.PERMANENT, "name-taken"),
    ("a field error", errors.RegistryRejected("m"), Kind.PERMANENT, "rejected"),
    ("the site's own 400, 405 or 407", errors.RegistryError("m"), Kind.TRANSIENT, "registry"),
    ("an endpoint missing (404)", errors.NotFound("m"), Kind.TRANSIENT, "not-found"),
    ("disk full", OSError(errno.ENOSPC, "full"), Kind.TRANSIENT, "archive-unavailable"),
    ("mount gone", OSError(errno.ENOTCONN, "gone"), Kind.TRANSIENT, "archive-unavailable"),
    ("name too long", OSError(errno.ENAMETOOLONG, "long"), Kind.PERMANENT, "name-too-long"),
    ("bad encoding", OSError(errno.EILSEQ, "seq"), Kind.PERMANENT, "invalid-name"),
    ("other filesystem", OSError(errno.EXDEV, "xdev"), Kind.PERMANENT, "cross-device"),
    ("odd errno", OSError(errno.ELOOP, "loop"), Kind.TRANSIENT, "os-error"),
    ("a bug", KeyError("x"), Kind.TRANSIENT, "internal"),
]


@pytest.mark.parametrize(("case", "err", "kind", "code"), TABLE, ids=[c[0] for c in TABLE])
def test_outcome_of_each_error(case: str, err: BaseException, kind: Kind, code: str) -> None:
    """Each error class and errno has one outcome kind and code."""
    outcome = outcome_for(err)
    assert (outcome.kind, outcome.code) == (kind, code)


def test_permanent_errnos_agree_with_the_archive_layer() -> None:
    """Every errno the archive layer calls hopeless is permanent for the steps too."""
    for number in errors.PERMANENT_ERRNOS:
        assert outcome_for(OSError(number, "x")).kind is Kind.PERMANENT


def test_an_unknown_outcome_kind_raises() -> None:
    """An outcome kind the life cycle does not know is refused when it is made."""
    with pytest.raises(ValueError):
        Outcome("maybe")


def test_backoff_jitter_comes_from_the_given_generator() -> None:
    """The same generator seed gives the same retry time; the jitter is passed in."""
    p = Progress(State.CHECKED)
    fail = Outcome(Kind.TRANSIENT, "registry-unavailable")
    first = advance(p, Step.REGISTER, fail, 100.0, random.Random(7))
    again = advance(p, Step.REGISTER, fail, 100.0, random.Random(7))
    assert first.not_before == again.not_before and 101.0 <= first.not_before <= 102.0

"""The status line for inputs an unexpected error fails again and again (a table)."""

from __future__ import annotations

from nbankd.daemon.status import bug_problem


def test_one_unexpected_error_is_not_told_yet() -> None:
    """A first unexpected error (retried soon) makes no status line."""
    assert bug_problem([("registered", 1, "/in/a.wav", "KeyError('x')")]) is None


def test_an_input_failing_again_is_named_with_its_error() -> None:
    """Two or more in a row at one state: the line names the input, the count and error."""
    line = bug_problem(
        [("registered", 3, "/in/a.wav", "KeyError('x')"), ("staged", 1, "/in/b.wav", "E")]
    )
    assert line is not None
    assert line.startswith("1 input(s) fail again and again")
    assert "/in/a.wav, 3 times in a row: KeyError('x')" in line and "/in/b.wav" not in line


def test_several_inputs_are_counted_and_one_is_named() -> None:
    """Several failing inputs: all counted, the first by path named, the rest summed."""
    line = bug_problem([("s", 2, "/in/b", "E1"), ("s", 4, "/in/a", "E2")])
    assert line is not None and line.startswith("2 input(s)") and "/in/a (and 1 more)" in line

"""Status lines for inputs a bug keeps failing and for workers stuck in a step."""

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


def test_no_stuck_worker_no_line() -> None:
    """No pool worker past wedge_after: no status line."""
    from nbankd.daemon.status import worker_problem

    assert worker_problem({}, 600.0) is None


def test_a_stuck_worker_is_told_with_the_input_it_holds() -> None:
    """A pool worker without a sign of life past wedge_after is told with its input."""
    from nbankd.daemon.status import worker_problem

    line = worker_problem({"deposit_0": "/in/big.wav"}, 600.0)
    assert line is not None and "over 600s" in line and "/in/big.wav" in line

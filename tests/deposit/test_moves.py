"""registry-moves.jsonl: following moves, going back without loops, finding the old registry."""

from __future__ import annotations

from pathlib import Path

from nbankd.deposit import moves

A = "file:///var/lib/nbankd/registry.sqlite3/"
B = "https://lab.example/neurobank/"
C = "https://new.example/neurobank/"


def test_going_back_and_forth_never_loops(tmp_path: Path) -> None:
    """A to B, then B to A: the later move wins, and following a URL always ends."""
    assert moves.record_move(tmp_path, A, B, time="1")
    assert moves.record_move(tmp_path, B, A, time="2")
    assert moves.read_moves(tmp_path) == {B: A}
    assert moves.current_url(A + "resources/x/", moves.read_moves(tmp_path)) == A + "resources/x/"
    assert moves.current_url(B + "resources/y/", moves.read_moves(tmp_path)) == A + "resources/y/"
    assert moves.record_move(tmp_path, A, B, time="3")  # and forth again: recorded
    assert moves.read_moves(tmp_path) == {A: B}
    assert moves.current_url(A + "resources/x/", {A: B, B: A}) in (
        A + "resources/x/",
        B + "resources/x/",
    )  # a loop given by hand stops too


def test_chains_are_followed_and_the_source_of_a_move_found(tmp_path: Path) -> None:
    """A to B to C: an A receipt shows under C; moved_to names the last registry moved."""
    moves.record_move(tmp_path, A, B, time="1")
    moves.record_move(tmp_path, B, C, time="2")
    assert moves.current_url(A + "resources/x/", moves.read_moves(tmp_path)) == C + "resources/x/"
    assert moves.moved_to(tmp_path, B) == A
    assert moves.moved_to(tmp_path, C.rstrip("/")) == B
    assert moves.moved_to(tmp_path, A) is None

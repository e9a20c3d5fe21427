"""attnlab.exercises: a check cell says "not answered yet", "wrong: try again" or "right",
and never prints the right answer unless it was given."""

from __future__ import annotations

import numpy as np
import pytest

from attnlab.exercises import NOT_ANSWERED, RIGHT, WRONG, check, verdict


@pytest.mark.parametrize(
    "mine, expected, tol, result",
    [
        (None, (228,), 0.0, NOT_ANSWERED),
        (228, (228,), 0.0, RIGHT),
        (228, (np.int64(228),), 0.0, RIGHT),  # numpy scalars compare as numbers
        (227, (228,), 0.0, WRONG),
        (0.42, (0.4271,), 0.01, RIGHT),
        (0.41, (0.4271,), 0.01, WRONG),
        (-3, (0, -3), 0.0, RIGHT),  # any of several right answers
        (1, (0, -3), 0.0, WRONG),
        ((1, 1), ((1, 1),), 0.0, RIGHT),
        ([1, 1], (np.array([1, 1]),), 0.0, RIGHT),  # a list for a tuple, an array for a tuple
        ((1, 2), ((1, 1),), 0.0, WRONG),
        ((1,), ((1, 1),), 0.0, WRONG),
        (True, (True,), 0.0, RIGHT),
        (False, (np.bool_(True),), 0.0, WRONG),
        (1, (True,), 0.0, WRONG),  # True/False questions want True or False
        (True, (1,), 0.0, WRONG),
        (" raw, layer 1 ", ("raw, layer 1",), 0.0, RIGHT),
        ("raw, layer 2", ("raw, layer 1",), 0.0, WRONG),
        ("228", (228,), 0.0, WRONG),
    ],
)
def test_verdict(mine, expected, tol, result):
    assert verdict(mine, *expected, tol=tol) == result


def test_check_prints_one_line_and_the_reason_only_after_a_right_answer(capsys):
    check(None, 228, why="S = 228")
    check(5, 228, why="S = 228")
    check(228, 228, why="S = 228")
    check(228, 228)
    assert capsys.readouterr().out.splitlines() == [NOT_ANSWERED, WRONG, f"{RIGHT}: S = 228", RIGHT]


def test_a_check_needs_a_right_answer():
    with pytest.raises(TypeError, match="at least one"):
        verdict(3)

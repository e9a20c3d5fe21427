"""Check cells of the notebooks' exercises: say whether an answer is right, never what it is.

    from attnlab.exercises import check
    check(my_S, answer)                  # "not answered yet" / "wrong: try again" / "right"
    check(my_layer, 0, -3)               # any of several right answers
    check(my_share, answer, tol=0.01)    # a number, right within tol
    check(my_S, answer, why=f"...")      # ``why`` is printed only after a right answer

An unanswered exercise (``None``) prints ``not answered yet`` and nothing else; a wrong
answer prints ``wrong: try again`` and nothing else, so running a check cell never
gives the answer away. Only a right answer prints ``right`` and, if given, ``why``.
"""

from __future__ import annotations

import numbers
from typing import Any

__all__ = ["NOT_ANSWERED", "RIGHT", "WRONG", "check", "verdict"]

NOT_ANSWERED = "not answered yet"
WRONG = "wrong: try again"
RIGHT = "right"


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as Python numbers, tuples and lists as tuples, strings stripped."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, str):
        return value.strip()
    return value


def _same(mine: Any, expected: Any, tol: float) -> bool:
    if isinstance(expected, bool) or isinstance(mine, bool):  # True is not the number 1 here
        return isinstance(mine, bool) and isinstance(expected, bool) and mine == expected
    if isinstance(mine, numbers.Real) and isinstance(expected, numbers.Real):
        return abs(mine - expected) <= tol
    if isinstance(mine, tuple) and isinstance(expected, tuple):
        return len(mine) == len(expected) and all(_same(a, b, tol) for a, b in zip(mine, expected))
    return type(mine) is type(expected) and mine == expected


def verdict(mine: Any, *expected: Any, tol: float = 0.0) -> str:
    """:data:`NOT_ANSWERED` for ``None``, :data:`RIGHT` if ``mine`` equals one of ``expected``
    (numbers within ``tol``; tuples element by element; strings stripped), else :data:`WRONG`."""
    if not expected:
        raise TypeError("verdict() needs at least one right answer")
    if mine is None:
        return NOT_ANSWERED
    mine = _plain(mine)
    return RIGHT if any(_same(mine, _plain(e), tol) for e in expected) else WRONG


def check(mine: Any, *expected: Any, tol: float = 0.0, why: str = "") -> None:
    """Print the :func:`verdict` of ``mine``; after a right answer also ``why``."""
    result = verdict(mine, *expected, tol=tol)
    print(f"{RIGHT}: {why}" if result == RIGHT and why else result)

"""Small assertions the test files share."""

from __future__ import annotations

import pytest

from attnlab.errors import AttnlabError


def assert_error(fn, *needles: str) -> str:
    """``fn()`` raises :class:`AttnlabError` with one line holding every needle; returns the message."""
    with pytest.raises(AttnlabError) as info:
        fn()
    message = str(info.value)
    assert message and "\n" not in message, repr(message)
    for needle in needles:
        assert needle in message, (needle, message)
    return message

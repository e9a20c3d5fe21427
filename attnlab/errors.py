"""The one exception type attnlab raises for problems a user can fix."""

from __future__ import annotations


class AttnlabError(Exception):
    """A problem with the user's input (image, checkpoint, network, arguments).

    The message is a single line that says what went wrong and what to do.
    The command line prints it as ``attnlab: error: <message>`` without a traceback.
    """

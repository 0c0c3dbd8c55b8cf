"""interplab's exception types.

`UserInputError` is what interplab raises for a mistake in what the user asked for or gave
it (a layer out of range, a vector of the wrong width, an unreadable file). It subclasses
ValueError, so code that catches ValueError keeps working. The CLI turns these (and OSError)
into one line on stderr and exit code 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserInputError(ValueError):
    """Bad input: the message says what was wrong and what to do."""


class ArtifactError(UserInputError):
    """A file or folder that interplab cannot read or write: the message names it."""

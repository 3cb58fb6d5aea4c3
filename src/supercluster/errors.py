"""The one exception type for mistakes a user can make.

Anything raised as `UserError` reaches the terminal as one sentence and a non-zero
exit (see `cli.main`); everything else is a bug and keeps its traceback.
"""

import difflib


class UserError(Exception):
    """A bad config, path, size or request: the message names the fix."""


def closest(word: str, choices) -> str:
    """' (did you mean X?)' for the nearest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""

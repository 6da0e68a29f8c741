"""Errors in what the user gave us (a corpus, a clip, a checkpoint, a config, a tokenizer), as opposed to bugs.

Every message reads '<what>: <problem>' (the file, directory or config key first). The entry points
(`emorl_jax.cli.run`) print a user error as one line, `error: <what>: <problem>`, and exit with status 2; any
other exception is a bug and keeps its traceback. Each class also derives from `ValueError`, so library callers
that catch `ValueError` keep working.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input the user can fix; the message is '<what>: <problem>'."""


class ConfigError(UserError, ValueError):
    """A run config (or command-line flag) whose value cannot work."""


class TokenizerError(UserError, ValueError):
    """A tokenizer that is missing, unreadable, or does not fit the model."""


def find_user_error(exc: BaseException | None) -> UserError | None:
    """`exc` itself or the first UserError in its chain of causes/contexts (grain and jax re-raise inside
    their own frames), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None

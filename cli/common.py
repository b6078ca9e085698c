"""Pieces shared by the click commands: turning library errors into one-line messages."""

from __future__ import annotations

import functools

import click

# Errors that carry a user-facing one-line message naming the file, tensor or option at fault.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, RuntimeError)


def one_line_errors(fn):
    """Report a library error as `Error: <message>` with exit code 1, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from e

    return wrapper


checkpoint_argument = click.argument("path", required=False, type=click.Path(exists=True, path_type=str))

"""Errors the `m6` command reports as one clear line instead of a traceback."""


class UserError(Exception):
    """A run-level problem with the user's input (a missing source, a broken file, a bad flag)."""

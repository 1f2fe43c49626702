"""Exceptions that cross the shell/CLI boundary."""


class UserError(Exception):
    """Bad input (a file, a field, a flag): shown as one line, exit code 2, no traceback."""


class Interrupted(UserError):
    """Ctrl-C stopped a run after saving a checkpoint: exit code 130."""

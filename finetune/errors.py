"""Exceptions that cross the shell/CLI boundary."""


class UserError(Exception):
    """Bad input (a file, a field, a flag): shown as one line, exit code 2, no traceback."""


class Interrupted(UserError):
    """Ctrl-C stopped a run after saving a checkpoint: exit code 130."""


def unwrap(result):
    """The value of a `returns` Success; a Failure's message becomes a `UserError` (exit 2)."""
    from returns.result import Failure, Success

    match result:
        case Success(value):
            return value
        case Failure(message):
            raise UserError(message)
    raise AssertionError(f"not a Result: {result!r}")

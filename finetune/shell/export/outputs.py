"""Where an export writes: the output's folder is created when missing (by the writer, just before
it writes); a file standing where a folder must be, or a folder that cannot be written, is refused
in one line before anything is read or written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from returns.result import Failure, Result, Success


def check_folder(output: Path, flag: str = "--output") -> Result[Path, str]:
    """The nearest existing folder above `output` (the writer creates the rest), or why it cannot be."""
    up = output.parent
    while not (up.exists() or up.is_symlink()) and up != up.parent:
        up = up.parent
    if not up.is_dir():
        return Failure(f"{up}: is a file, not a folder; {flag} {output} needs a folder there")
    try:  # the real test of writability (root passes os.access on a read-only mount, for one)
        fd, probe = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".probe", dir=up)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return Failure(f"{up}: not writable ({err.strerror or err}); choose another {flag}")
    return Success(up)

"""The one error users see: a line naming the problem and the fix."""

from __future__ import annotations

import errno

from pydantic import ValidationError


class NlsflowError(Exception):
    """A user-facing problem: the message is one line naming the problem and the fix."""


def format_validation_error(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key '{where}' (check the spelling against the models in schemas/)")
        elif err["type"] == "missing":
            parts.append(f"missing key '{where}'")
        else:
            got = repr(err.get("input"))
            parts.append(f"{where}: {err['msg']}" + (f" (got {got})" if len(got) <= 80 else ""))
    return "; ".join(parts)


def storage_error(e: OSError) -> str | None:
    """A full disk, a quota or a read-only file system, as one line; None for other OS errors."""
    where = e.filename or "the run folder"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"no space left writing {where} ({e.strerror}); free space there and re-run: the stages that finished "
            "are kept, this one wrote nothing"
        )
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot access {where} ({e.strerror}); make it accessible to this user, or give another run_dir"
    return None

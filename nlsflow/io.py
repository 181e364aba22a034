"""Atomic writes and content digests: nothing half-written ever sits at a final path."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes owner-only files; artifacts are shared (containers, UI)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def folder_bytes(folder: Path) -> int:
    """Bytes on disk of a folder's files (not its model card, README.md)."""
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file() and f.name != "README.md")


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


@contextlib.contextmanager
def atomic_dir(path: Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a fresh temp folder beside `path`; on success it replaces `path` whole, on failure it is removed.

    With keep_existing, a `path` that appeared meanwhile (another process built the same cache entry) wins.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        share_tree(tmp)
        if keep_existing and path.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def share_tree(folder: Path) -> None:
    """Give every file and folder under `folder` the modes the umask allows (libraries such as safetensors write
    owner-only files); run folders are shared: containers, the UI, colleagues on a cluster."""
    mask = _umask()
    for path in [Path(folder), *Path(folder).rglob("*")]:
        if path.is_symlink():
            continue
        full = 0o777 if path.is_dir() else 0o666
        mode = path.stat().st_mode & 0o7777
        if (mode | full) & ~mask != mode:
            os.chmod(path, (mode | full) & ~mask)


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder `src` to `dst`, replacing whatever `dst` held; `dst` is never left half-made."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

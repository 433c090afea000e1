"""Atomic file output: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["current_umask", "replace_directory", "write_atomic"]


def current_umask() -> int:
    """The process umask (read without changing it for longer than a moment)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Writes ``data`` to ``path`` through a temporary file in the same directory and a rename.

    The parent directory is created; the file gets the usual permissions
    (0666 less the umask). On any error the temporary file is removed and an
    existing ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def replace_directory(
    path: str | os.PathLike,
    fill: Callable[[Path], None],
    *,
    owned: Callable[[Path], bool],
) -> Path:
    """Writes a directory as one unit: ``fill(tmp)`` writes a temporary sibling, which then
    replaces ``path``.

    Never deletes what the package did not write: an existing ``path`` must be
    an empty directory or one for which ``owned(path)`` is True. A reader sees
    the old set of files or the new one; when ``fill`` raises, the temporary
    directory is removed and ``path`` is left as it was.

    Raises:
      InputError: ``path`` is an existing file, or a non-empty directory that
        ``owned`` does not recognise (nothing is written).
    """
    from deepfault_jax.errors import InputError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"output directory must not be an existing file; got {str(path)!r}")
    if path.is_dir() and any(path.iterdir()) and not owned(path):
        raise InputError(
            f"output directory {str(path)!r} is not empty and was not written by deepfault-jax; "
            "choose an empty or new directory (nothing was changed)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        fill(tmp)
        os.chmod(tmp, 0o777 & ~current_umask())
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old / "set")
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old / "set", path)  # put the earlier set back
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path

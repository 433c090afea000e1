"""Atomic file output: a reader sees the old file or the new one, never half of one.

And the rule every output directory follows: the package never deletes or
replaces anything it did not write. :func:`replace_directory` overwrites only
an empty directory or one that its caller recognises as an earlier output of
its own (``owned``); anything else is refused with an :class:`InputError`
naming the path.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from deepfault_jax.errors import InputError, describe_os_error

__all__ = [
    "check_replaceable",
    "current_umask",
    "is_empty_dir",
    "replace_directory",
    "write_atomic",
]


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

    Raises:
      InputError: the file cannot be written (a full disk, a read-only or immutable
        file or directory): the path and the system's reason are named.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise InputError(f"cannot write {str(path)!r}: {describe_os_error(e)}") from None
        raise
    return path


def is_empty_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory with no entries (False when it is missing or a file)."""
    try:
        with os.scandir(path) as entries:
            return next(entries, None) is None
    except OSError:
        return False


def _absolute(path: str | os.PathLike) -> Path:
    """``path`` made absolute with ``~`` expanded and ``.``/``..`` resolved by name (so the
    parent of ``.`` is the parent of the current directory, not ``.`` itself)."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def check_replaceable(
    path: str | os.PathLike,
    *,
    owned: Callable[[Path], bool],
    what: str = "output directory",
) -> Path:
    """Checks, before any work, that :func:`replace_directory` may write ``path``.

    Args:
      path: the destination directory.
      owned: tells whether a non-empty directory holds an earlier output of the
        caller's own (for a checkpoint: its ``model.json`` says so).
      what: how messages name the destination (``"--out"``, ``"checkpoint directory"``).

    Returns:
      ``path`` as an absolute path.

    Raises:
      InputError: ``path`` is an existing file, a symbolic link, or a non-empty
        directory that ``owned`` does not recognise. The message names the path.
    """
    target = _absolute(path)
    if target.is_symlink():
        raise InputError(
            f"{what} must be a directory, not a symbolic link; got {str(target)!r} "
            f"(a link to {os.readlink(target)!r}); refusing to replace it"
        )
    if target.exists() and not target.is_dir():
        raise InputError(f"{what} must be a directory; got existing file {str(target)!r}")
    if target.is_dir() and not is_empty_dir(target) and not owned(target):
        raise InputError(
            f"{what} {str(target)!r} is not empty and was not written by deepfault-jax; "
            "refusing to replace it (choose a new or empty directory; nothing was changed)"
        )
    return target


def replace_directory(
    path: str | os.PathLike,
    fill: Callable[[Path], None],
    *,
    owned: Callable[[Path], bool],
    what: str = "output directory",
) -> Path:
    """Writes a directory as one unit: ``fill(tmp)`` fills a temporary sibling that then
    takes the place of ``path``.

    Never deletes what the package did not write: an existing ``path`` must be
    an empty directory or one for which ``owned(path)`` is True (checked before
    ``fill`` runs and again before the swap). The temporary directory is a
    hidden sibling (same parent, so the swap is a rename): the old directory is
    renamed aside, the new one renamed in, then the old one removed, so a reader
    sees the old set of files or the new one, never a mixture. When ``fill``
    raises (``KeyboardInterrupt`` included), the temporary directory is removed
    and ``path`` is left as it was.

    Args:
      path: the destination directory; missing parents are created.
      fill: writes the new contents into the directory it is given.
      owned: recognises an earlier output of the caller's own (see
        :func:`check_replaceable`).
      what: how messages name the destination.

    Returns:
      The absolute destination path.

    Raises:
      InputError: ``path`` may not be replaced (see :func:`check_replaceable`),
        or its parent directory cannot be written (the reason is named).
      Exception: whatever ``fill`` raises.
    """
    target = check_replaceable(path, owned=owned, what=what)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    except OSError as e:
        raise InputError(
            f"{what} must be a writable location; got {str(target)!r} ({describe_os_error(e)})"
        ) from None
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private
        fill(tmp)
        check_replaceable(target, owned=owned, what=what)  # still so after a long fill?
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _swap_in(new: Path, target: Path) -> None:
    """Renames ``new`` to ``target``; an existing ``target`` is renamed aside first and
    removed after (put back if the second rename fails)."""
    if not target.exists():
        os.replace(new, target)
        return
    aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
    os.replace(target, aside / "old")
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(aside / "old", target)  # put the earlier set back
        os.rmdir(aside)
        raise
    shutil.rmtree(aside, ignore_errors=True)

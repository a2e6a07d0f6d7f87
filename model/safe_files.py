"""Opening files of the model repository defensively: regular files only, links kept inside.

Anyone who can write into the repository can plant a FIFO, a socket, a device node or a
symbolic link where a reader expects ``model.safetensors`` or ``manifest.json``. Opening a FIFO
for reading blocks until a writer appears (forever, for a planted one), and a link can point at
any file the server may read. So every read goes through :func:`open_regular_file`:

1. the path is resolved (``realpath``); with a ``root``, a target outside ``realpath(root)``
   raises :class:`LinkOutsideRepositoryError` (links that stay inside the root are followed);
2. the target is opened with ``O_NOFOLLOW | O_NONBLOCK`` (a FIFO opens at once instead of
   blocking; a link swapped in after step 1 is refused by the kernel);
3. ``fstat`` on the open descriptor must say ``S_ISREG``, else :class:`NotARegularFileError`;
   only then is blocking mode restored for the reads.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO, NoReturn

from model.errors import LinkOutsideRepositoryError, NotARegularFileError

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_KINDS = (
    (stat.S_ISDIR, "directory"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


def file_kind(mode: int) -> str:
    """What ``st_mode`` describes, in words: "regular file", "FIFO", "socket"..."""
    if stat.S_ISREG(mode):
        return "regular file"
    return next((name for is_kind, name in _KINDS if is_kind(mode)), "special file")


def resolve_inside(path: str | os.PathLike[str], root: str | os.PathLike[str] | None) -> Path:
    """``realpath(path)``; with ``root``, LinkOutsideRepositoryError unless the resolved path is
    ``realpath(root)`` or below it."""
    resolved = Path(os.path.realpath(path))
    if root is None:
        return resolved
    real_root = Path(os.path.realpath(root))
    if resolved != real_root and real_root not in resolved.parents:
        raise LinkOutsideRepositoryError(
            f"{path} resolves to {resolved}, outside the repository {real_root}; "
            "expected links that stay inside the repository"
        )
    return resolved


def open_regular_file(
    path: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None
) -> BinaryIO:
    """Open ``path`` for binary reading if it is a regular file (inside ``root`` when given);
    never blocks on a FIFO. The caller closes the returned file."""
    resolved = resolve_inside(path, root)
    try:
        fd = os.open(resolved, _OPEN_FLAGS)
    except OSError as exc:
        _raise_for_open_error(path, resolved, exc)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotARegularFileError(f"{path} is a {file_kind(mode)}; expected a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_file(
    path: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None
) -> bytes:
    """The bytes of the regular file ``path`` (see :func:`open_regular_file`)."""
    with open_regular_file(path, root=root) as handle:
        return handle.read()


def _raise_for_open_error(path: object, resolved: Path, exc: OSError) -> NoReturn:
    """Translate what ``open`` says about a special file into a named error; re-raise others."""
    try:
        mode = os.lstat(resolved).st_mode
    except OSError:
        raise exc from None
    if not stat.S_ISREG(mode):  # a socket (ENXIO), a link swapped in (ELOOP), a directory...
        raise NotARegularFileError(
            f"{path} is a {file_kind(mode) if not stat.S_ISLNK(mode) else 'symbolic link'}; "
            "expected a regular file"
        ) from None
    raise exc

"""Files written whole or not at all: caches, digests memos, reports.

A reader running beside a writer (two scripts sharing one cache, a crash mid-write) must never
see half a file. Both writers here write a temporary file next to the target, in the same
directory (so the final step is a rename or link within one file system), and only then give it
the target's name. The temporary name keeps the target's suffix, because NumPy's savers append
``.npy``/``.npz`` to a name without it.

`write_atomic` replaces what was there (caches: any complete version is as good as another);
`write_new` never does (results: an earlier result is not the writer's to destroy).
"""

from __future__ import annotations

import os
import pathlib
import socket
from collections.abc import Callable


def _temporary(path: pathlib.Path) -> pathlib.Path:
    # host and pid: the processes of a multi-host run may write into one shared folder
    return path.with_name(f".{path.stem}.{socket.gethostname()}-{os.getpid()}.tmp{path.suffix}")


def write_atomic(path: str | os.PathLike, write: Callable[[pathlib.Path], object]) -> None:
    """``write(temporary)``, then renames the temporary over `path` (creating its directory).

    Args:
      path: the target file; replaced if it exists.
      write: writes the whole content to the path it is given.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_new(path: str | os.PathLike, write: Callable[[pathlib.Path], object]) -> None:
    """Like `write_atomic`, but never replaces an existing `path`.

    The temporary is hard-linked to `path`, which fails if `path` exists, however late it
    appeared: there is no window between a check and the write.

    Raises:
      FileExistsError: `path` exists (it is left untouched).
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        write(tmp)
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

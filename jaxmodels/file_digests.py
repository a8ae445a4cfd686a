"""Digests of files by their content: the identity of a checkpoint or a data file for caches.

Two copies of one checkpoint give one digest, wherever they lie (a folder's files count by their
paths inside it, a file by its name); a changed byte or file name gives another. Reading
gigabytes of weights at every cache lookup would cost more than the lookup saves, so a memo file
may remember each digest by the files' paths, sizes and modification times.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

from jaxmodels.atomic_files import write_atomic


def content_digest(path: str | pathlib.Path, *, memo: str | pathlib.Path | None = None) -> str:
    """SHA-256 of a checkpoint's bytes: a file, or every file of a directory with its relative path.

    Cache keys and run folders use it to tell whether two checkpoints hold the same weights.

    Args:
      path: the checkpoint file or directory.
      memo: a JSON file remembering digests by the files' paths, sizes and modification times,
        so that a cache lookup does not re-read gigabytes of unchanged weights; created or
        updated atomically. None reads the bytes every time.
    """
    path = pathlib.Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if memo is not None:
        memo = pathlib.Path(memo)
        stamp = hashlib.sha256(
            "".join(
                f"{f.absolute()}|{f.stat().st_size}|{f.stat().st_mtime_ns}\n" for f in files
            ).encode()
        ).hexdigest()
        try:
            known = json.loads(memo.read_text())
        except (OSError, ValueError):
            known = {}
        if not isinstance(known, dict):
            known = {}
        if isinstance(known.get(stamp), str):
            return known[stamp]
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                digest.update(block)
    if memo is not None:
        known[stamp] = digest.hexdigest()
        write_atomic(memo, lambda tmp: tmp.write_text(json.dumps(known)))
    return digest.hexdigest()

"""Folders made once per test run and shared by its xdist workers.

A slow setup (a launch, a hub of saved models, a sweep of runs) is made by the first worker
that needs it, under a lock; the other waits, then reads what it made. Without xdist the folder
lives in the run's own temporary folder.
"""

import contextlib
import fcntl
import os
import shutil


@contextlib.contextmanager
def made_once(tmp_path_factory, name: str):
    """Yields ``(folder, missing)``: the caller fills the (empty) folder when ``missing``.

    The folder counts as made only once the block exits without an error: a setup that failed
    halfway is emptied and made again by the next test that needs it, which then fails on its
    own account rather than reading half a folder.
    """
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    with open(f"{root}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        done = root.with_name(f"{name}.done")
        missing = not done.exists()
        if missing:
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
        yield root, missing
        done.touch()

"""Reading orbax checkpoints: as NumPy arrays whoever wrote them, and quietly when they are broken.

`restore_as_numpy` reads any orbax checkpoint directory (hubtune's `variables/`, a training
state, a bare `StandardCheckpointer` save) without the shardings it was saved with. `quiet_orbax`
keeps a broken checkpoint's failure to the caller's one line: orbax and absl log pages of retries,
and the reads orbax abandons leave tracebacks behind after the error was reported.
"""

from __future__ import annotations

import logging
import pathlib
import sys

import jax
import numpy as np


def _closed_loop_noise(exc: BaseException | None) -> bool:
    """Whether `exc` is only "Event loop is closed" errors (alone or in an exception group)."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_closed_loop_noise(e) for e in exc.exceptions)
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _drop_closed_loop_noise(previous):
    """An unraisable-exception hook that drops orbax's late callbacks, passing on the rest.

    When one read of a broken checkpoint fails, orbax ends its event loop while tensorstore's
    other reads are still in flight; their completion callbacks later find the loop closed and
    Python prints each as "Exception ignored ... RuntimeError: Event loop is closed" (7–43
    lines after the caller's one-line error). They carry nothing: the failure was reported.
    """

    def hook(unraisable):
        if not _closed_loop_noise(unraisable.exc_value):
            previous(unraisable)

    hook.drops_closed_loop_noise = True
    return hook


class _DropLostReads(logging.Filter):
    """Drops asyncio's "... exception was never retrieved" reports of tensorstore reads that orbax
    abandoned when another read of the same broken checkpoint failed first (already reported)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        lost = "exception was never retrieved" in str(record.msg)
        return not (lost and exc is not None and "tensorstore" in str(exc))


class quiet_orbax:
    """Silences orbax/absl logging while a possibly broken checkpoint is read, and from then on
    the noise its abandoned in-flight reads leave behind (`_drop_closed_loop_noise`,
    `_DropLostReads`):
    the caller reports the failure in one line instead of pages of retries and tracebacks."""

    def __enter__(self):
        if not getattr(sys.unraisablehook, "drops_closed_loop_noise", False):
            sys.unraisablehook = _drop_closed_loop_noise(sys.unraisablehook)
        asyncio_logger = logging.getLogger("asyncio")
        if not any(isinstance(f, _DropLostReads) for f in asyncio_logger.filters):
            asyncio_logger.addFilter(_DropLostReads())
        self.loggers = [logging.getLogger(n) for n in ("absl", "orbax", "jax._src.distributed")]
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.CRITICAL)

    def __exit__(self, *exc):
        for lg, level in zip(self.loggers, self.levels, strict=True):
            lg.setLevel(level)


def restore_as_numpy(directory: pathlib.Path):
    """The pytree of an orbax checkpoint directory as NumPy arrays, whoever wrote it.

    Restoring without a target would rebuild each array with the sharding it was saved from:
    device ids that may not exist here, or (multi-process) arrays no process can read whole.
    """
    import orbax.checkpoint as ocp

    # Both checkpointers are closed on the way out, also when the files are broken: an open
    # one leaves orbax's event loop to fail at exit ("RuntimeError: Event loop is closed").
    # Quiet: read as one item of a CheckpointManager's step, orbax warns that the step's
    # _CHECKPOINT_METADATA (one folder up) is missing here; failures still raise.
    with quiet_orbax(), ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(directory).item_metadata
    metadata = getattr(metadata, "tree", metadata)
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    with quiet_orbax(), ocp.PyTreeCheckpointer() as checkpointer:
        return checkpointer.restore(directory, args=ocp.args.PyTreeRestore(restore_args=as_numpy))

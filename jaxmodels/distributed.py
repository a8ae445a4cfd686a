"""Start-up of a multi-process JAX program, and the checks every process runs together.

JAX's multi-controller runtime runs one program as several processes (one per host on a Cloud
TPU pod slice or a GPU cluster; several on one machine in CI), each feeding its own devices, all
joined by `jax.distributed.initialize`. Scripts call `initialize(args.distributed)` first, before
any array is made; it covers the three ways a program starts:

- under ``python -m training.launch --processes P --devices-per-process D``: the launcher sets
  ``HUBTUNE_NUM_PROCESSES``, ``HUBTUNE_PROCESS_ID`` and JAX's own ``JAX_COORDINATOR_ADDRESS``,
  ``JAX_NUM_CPU_DEVICES``, ``JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo`` and ``JAX_PLATFORMS=cpu``
  (read by JAX itself), and this joins the P processes at ``localhost:PORT``; on hosts without
  a scheduler the same three variables, set by hand on every host, join them the same way;
- with ``--distributed`` on a TPU VM pod slice, a SLURM job, Kubernetes or Open MPI:
  ``jax.distributed.initialize()`` with no arguments, JAX's own cluster detection;
- neither: a plain single-process run (nothing to do).

A process that cannot reach the coordinator would otherwise be aborted by JAX's C++ client with
a stack trace after 300 s; here a watchdog ends it first with one line naming the address
(`DISTRIBUTED_EXIT_CODE`). `check_same_config` then makes sure every process was started with
the same settings, naming the one that differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Mapping

import jax
import numpy as np

NUM_PROCESSES_ENV = "HUBTUNE_NUM_PROCESSES"
PROCESS_ID_ENV = "HUBTUNE_PROCESS_ID"
TIMEOUT_ENV = "HUBTUNE_INIT_TIMEOUT"
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"  # JAX reads it too
DEFAULT_TIMEOUT_S = 300.0  # hosts of a cluster may start minutes apart
DISTRIBUTED_EXIT_CODE = 2


class DistributedError(RuntimeError):
    """Processes that cannot work together (other settings, no coordinator): one line."""


def launched_processes() -> int:
    """The process count `training.launch` started this program with (1 when not launched)."""
    return int(os.environ.get(NUM_PROCESSES_ENV, "1"))


def initialize(distributed: bool = False, *, timeout_s: float | None = None) -> None:
    """Joins this process to the others of its program; call first, before any array is made.

    Args:
      distributed: use JAX's cluster detection (`jax.distributed.initialize()` with no
        arguments: Cloud TPU, SLURM, Kubernetes, Open MPI, or ``JAX_COORDINATOR_ADDRESS`` with
        a detected environment). Ignored under `training.launch`, whose variables say it all.
      timeout_s: how long to wait for the coordinator and the other processes; default
        ``$HUBTUNE_INIT_TIMEOUT`` or 300 s.

    Exits the process with status `DISTRIBUTED_EXIT_CODE` and one line on stderr when the
    coordinator is not reached in time (JAX would abort it with a stack trace).
    """
    count = launched_processes()
    if count > 1:
        kwargs = {
            "coordinator_address": os.environ[COORDINATOR_ENV],
            "num_processes": count,
            "process_id": int(os.environ[PROCESS_ID_ENV]),
        }
    elif distributed:
        kwargs = {}
    else:
        return
    if jax.distributed.is_initialized():
        return
    timeout_s = (
        float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)) if timeout_s is None else timeout_s
    )
    joined = threading.Event()
    threading.Thread(target=_watchdog, args=(joined, timeout_s, kwargs), daemon=True).start()
    # JAX's own deadline comes later than the watchdog's, so the one-line message wins
    jax.distributed.initialize(**kwargs, initialization_timeout=int(timeout_s) + 30)
    joined.set()


def _watchdog(joined: threading.Event, timeout_s: float, kwargs: dict) -> None:
    start = time.monotonic()
    if joined.wait(timeout_s):
        return
    from jax._src import distributed as jax_distributed  # the address cluster detection chose

    address = kwargs.get("coordinator_address") or getattr(
        jax_distributed.global_state, "coordinator_address", None
    )
    process = kwargs.get("process_id", getattr(jax_distributed.global_state, "process_id", "?"))
    print(
        f"hubtune: process {process} could not join the others at the coordinator "
        f"{address or '(none detected)'} within {time.monotonic() - start:.0f} s: start the same "
        "command on every host, check that process 0 runs there and that the address and port "
        f"are reachable (wait longer with ${TIMEOUT_ENV})",
        file=sys.stderr,
        flush=True,
    )
    os._exit(DISTRIBUTED_EXIT_CODE)


def config_digest(config: Mapping) -> str:
    """SHA-256 of a JSON-able config (keys sorted; non-JSON values by their ``str``)."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def check_same_config(config: Mapping, what: str = "arguments") -> None:
    """Raises on every process unless all processes hold the same `config` (a collective).

    Processes started with different arguments would compute different things and then hang
    in their first collective, or silently train a mixture; compare a hash at start-up instead.

    Args:
      config: this process's settings (e.g. the parsed command line), JSON-able.
      what: how the message names them.

    Raises:
      DistributedError: some process's hash differs from process 0's (the first one named).
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    digest = config_digest(config)
    words = np.frombuffer(bytes.fromhex(digest)[:16], dtype=np.uint32)
    every = np.asarray(multihost_utils.process_allgather(words)).reshape(jax.process_count(), -1)
    differing = [p for p in range(len(every)) if not np.array_equal(every[p], every[0])]
    if differing:
        hexes = [every[p].astype("<u4").tobytes().hex()[:12] for p in (0, differing[0])]
        raise DistributedError(
            f"process {differing[0]} was started with other {what} than process 0 (config hash "
            f"{hexes[1]} vs {hexes[0]}; {len(differing)} of {len(every)} processes differ): "
            "start the same command on every host"
        )

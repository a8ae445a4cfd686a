"""Run a script as P JAX processes × D CPU devices on this machine: a real multi-host run in CI.

    python -m training.launch --processes 2 --devices-per-process 4 -- scripts/finetune.py ...

Starts P copies of ``python SCRIPT ARGS…`` (``-m module`` and ``-c code`` work too) joined by
JAX's distributed runtime at ``localhost:PORT`` (a free port), with CPU collectives over gloo:
the same multi-controller program a TPU pod slice or a GPU cluster runs, one process per host.
Each child learns its place from environment variables that `jaxmodels.distributed.initialize`
reads at start-up (scripts call it first). ``--processes 1`` is a plain run on D fake CPU
devices. Every line a child prints comes out prefixed ``[p0]``, ``[p1]``, …; when a child fails,
the others are stopped and the launcher exits with the failing child's status.

On a real cluster there is no launcher: start the same command on every host with
``--distributed`` (docs/multihost.md).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from jaxmodels import distributed

STOP_GRACE_S = 5.0
TIMEOUT_EXIT_CODE = 124  # as coreutils' timeout


def free_port() -> int:
    """A TCP port nothing listens on right now (the coordinator binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def child_env(process_id: int, processes: int, devices: int, port: int) -> dict[str, str]:
    """The environment of child `process_id`: CPU devices, and where the others are."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUBTUNE_")}
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_NUM_CPU_DEVICES=str(devices),
        PYTHONUNBUFFERED="1",  # lines reach the prefixing thread as they are printed
    )
    env.pop(distributed.COORDINATOR_ENV, None)
    if processes > 1:
        env.update({
            distributed.NUM_PROCESSES_ENV: str(processes),
            distributed.PROCESS_ID_ENV: str(process_id),
            distributed.COORDINATOR_ENV: f"localhost:{port}",
            "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
        })  # fmt: skip
    if distributed.TIMEOUT_ENV in os.environ:
        env[distributed.TIMEOUT_ENV] = os.environ[distributed.TIMEOUT_ENV]
    return env


def _relay(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, b""):
        out.write(prefix + line.decode(errors="replace"))
        out.flush()
    stream.close()


def _stop(children: list[subprocess.Popen]) -> None:
    """SIGTERM to every running child's process group, SIGKILL to those still alive later."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [c for c in children if c.poll() is None]
        for child in alive:
            try:
                os.killpg(child.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_GRACE_S
        while any(c.poll() is None for c in alive) and time.monotonic() < deadline:
            time.sleep(0.05)


def launch(
    command: list[str], processes: int, devices_per_process: int, timeout_s: float | None = None
) -> int:
    """Runs ``python *command`` as `processes` joined processes; returns the run's exit status.

    Args:
      command: what follows ``python``: ``[SCRIPT, *ARGS]``, ``["-m", MODULE, ...]`` or
        ``["-c", CODE]``.
      processes: P, processes joined at ``localhost:PORT`` (1: a plain run).
      devices_per_process: D, fake CPU devices of each.
      timeout_s: stop every process after this many seconds (a hang — a collective one process
        never reached — then fails instead of blocking); ``None`` waits forever.

    Returns:
      0 when every process succeeds, else the status of the first process that failed (128 + N
      for a process killed by signal N), or `TIMEOUT_EXIT_CODE` when `timeout_s` ran out.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    port = free_port()
    children, relays = [], []
    for i in range(processes):
        child = subprocess.Popen(
            [sys.executable, *command],
            env=child_env(i, processes, devices_per_process, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: stopping it stops its workers
        )
        children.append(child)
        for stream, out in ((child.stdout, sys.stdout), (child.stderr, sys.stderr)):
            relay = threading.Thread(target=_relay, args=(stream, f"[p{i}] ", out), daemon=True)
            relay.start()
            relays.append(relay)
    status = 0
    try:
        # poll every child each round (a short-circuiting any() would leave a dead child's
        # returncode unread behind a live one)
        while status == 0 and [c.poll() for c in children].count(None):
            failed = [(i, c.returncode) for i, c in enumerate(children) if c.returncode]
            if failed:
                i, code = failed[0]
                status = code if code > 0 else 128 - code
                print(f"[launch] process {i} exited with status {status}; stopping the others",
                      file=sys.stderr, flush=True)  # fmt: skip
            elif deadline is not None and time.monotonic() > deadline:
                status = TIMEOUT_EXIT_CODE
                print(f"[launch] still running after {timeout_s:g} s; stopping every process",
                      file=sys.stderr, flush=True)  # fmt: skip
            time.sleep(0.05)
        if status == 0:
            codes = [c.returncode for c in children]
            bad = next((code for code in codes if code), 0)
            status = bad if bad >= 0 else 128 - bad
    finally:
        _stop(children)
        for relay in relays:
            relay.join(timeout=STOP_GRACE_S)
    return status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="python -m training.launch",
        description="Run SCRIPT as P JAX processes of D CPU devices each, joined on localhost "
        "(gloo collectives): a multi-host run on one machine. Output lines are prefixed [pI]; "
        "a failing process stops the others and its exit status is the run's.",
        epilog="example: python -m training.launch --processes 2 --devices-per-process 4 -- "
        "scripts/finetune.py --model vit_tiny --data train.npz --mode full --out runs/two",
    )
    parser.add_argument("--processes", type=int, default=2, help="P, processes (default 2)")
    parser.add_argument(
        "--devices-per-process", type=int, default=4, help="D, CPU devices each (default 4)"
    )
    parser.add_argument(
        "--timeout", type=float, help="stop every process after this many seconds (exit 124)"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- SCRIPT ARGS…")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the script to run after --, e.g. -- scripts/rank.py --help")
    if args.processes < 1 or args.devices_per_process < 1:
        parser.error(
            f"--processes and --devices-per-process must be ≥ 1; got {args.processes} and "
            f"{args.devices_per_process}"
        )
    if args.timeout is not None and not args.timeout > 0:
        parser.error(f"--timeout must be > 0 seconds; got {args.timeout}")
    return launch(command, args.processes, args.devices_per_process, args.timeout)


if __name__ == "__main__":
    sys.exit(main())

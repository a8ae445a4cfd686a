"""The command-line conventions every hubtune command shares: its parser and Ctrl-C.

Three things argparse and Python do not do by default, the same for every command:

* a bad option is one line on stderr and exit status 2 (argparse prints its whole usage first);
* a negative number is a value, also in exponent form: ``--lr -1e-3`` reaches the command,
  which then says what is wrong with it (argparse took ``-1e-3`` for an option and answered
  "expected one argument");
* Ctrl-C ends the command with one line and exit status 130, not a traceback (`interruptible`).

Options that mean the same in several commands are declared here once (`add_distributed_option`).
"""

from __future__ import annotations

import argparse
import functools
import re
import sys

# argparse's own pattern (``^-\d+$|^-\d*\.\d+$``) misses "-1e-3", "-1." and "-2E5"
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class Parser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` with one-line errors and negative numbers as values."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    @classmethod
    def from_doc(cls, prog: str, doc: str) -> Parser:
        """A parser whose --help is `doc`: its first paragraph above the options, the rest below
        them as written (examples, notes)."""
        summary, _, details = doc.partition("\n\n")
        return cls(
            prog=prog,
            description=summary,
            epilog=details,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )


def add_distributed_option(parser: argparse.ArgumentParser) -> None:
    """``--distributed``: the commands that run on several hosts join them first
    (`jaxmodels.distributed.initialize`)."""
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host: join the other hosts' processes first (jax.distributed.initialize() "
        "with JAX's cluster detection: Cloud TPU, SLURM, ...); start the same command on every "
        "host",
    )


def interruptible(prog: str):
    """Decorates a command's ``main``: Ctrl-C prints one line and returns 130 (128 + SIGINT).

    Commands clean up on their way out (`finally` blocks, staged folders), so what a user sees
    is the line, and what is on disk is what was complete.
    """

    def decorate(main):
        @functools.wraps(main)
        def wrapped(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except KeyboardInterrupt:
                print(f"{prog}: interrupted; nothing incomplete was kept", file=sys.stderr)
                return 130

        return wrapped

    return decorate

"""The command-line parser every hubtune command uses.

Two things argparse does not do by default, the same for every command:

* a bad option is one line on stderr and exit status 2 (argparse prints its whole usage first);
* a negative number is a value, also in exponent form: ``--lr -1e-3`` reaches the command,
  which then says what is wrong with it (argparse took ``-1e-3`` for an option and answered
  "expected one argument").
"""

from __future__ import annotations

import argparse
import re

# argparse's own pattern (``^-\d+$|^-\d*\.\d+$``) misses "-1e-3", "-1." and "-2E5"
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class Parser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` with one-line errors and negative numbers as values."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

"""`python scripts/cascade.py` from a checkout: the same program as `hubtune serve`; see `--help`."""

import sys

from hubtune.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())

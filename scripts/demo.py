"""`python scripts/demo.py` from a checkout: the same program as `hubtune demo`; see `--help`."""

import sys

from hubtune.demo.workflow import main

if __name__ == "__main__":
    sys.exit(main())

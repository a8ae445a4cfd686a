"""`python scripts/rank.py` from a checkout: the same program as `hubtune rank`; see `--help`."""

import sys

from hubtune.rank import main

if __name__ == "__main__":
    sys.exit(main())

"""`python scripts/soup.py` from a checkout: the same program as `hubtune soup`; see `--help`."""

import sys

from hubtune.soup.cli import main

if __name__ == "__main__":
    sys.exit(main())

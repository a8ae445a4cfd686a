"""`python scripts/finetune.py` from a checkout: the same program as `hubtune tune`; see `--help`."""

import sys

from hubtune.tune import main

if __name__ == "__main__":
    sys.exit(main())

"""`python -m corolla COMMAND ...`: the same dispatcher as the `corolla` command (`protos.cli:main`)."""

from __future__ import annotations

import sys

from protos.cli import main

if __name__ == "__main__":
    sys.exit(main())

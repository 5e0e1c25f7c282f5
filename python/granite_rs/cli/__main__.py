"""``python -m granite_rs.cli``: the same as ``python -m granite_rs``."""

import sys

from granite_rs.cli import main

if __name__ == "__main__":
    sys.exit(main())

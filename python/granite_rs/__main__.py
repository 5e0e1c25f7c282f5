"""``python -m granite_rs``: the ``granite-rs`` command line (see granite_rs.cli)."""

import sys

from granite_rs.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m esprelay``."""

from __future__ import annotations

import sys

from esprelay.cli import main

if __name__ == "__main__":
    sys.exit(main())

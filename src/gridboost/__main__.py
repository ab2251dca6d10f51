"""``python -m gridboost``: the ``gridboost`` command (see :mod:`gridboost._cli`)."""

from __future__ import annotations

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())

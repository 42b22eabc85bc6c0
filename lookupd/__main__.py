"""`python -m lookupd` runs the same CLI as the `lookupd` script."""

from __future__ import annotations

import sys

from lookupd.cli import main

sys.exit(main())

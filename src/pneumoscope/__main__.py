"""``python -m pneumoscope`` runs the command line."""

from __future__ import annotations

import sys

from pneumoscope.cli import main

# Already re-executed (or opted out): parse the arguments directly.
sys.exit(main(sys.argv[1:]))

"""``python -m metroem <command>``: the same as the ``metroem`` command (metroem.cli)."""

import sys

from metroem.cli import main

sys.exit(main())

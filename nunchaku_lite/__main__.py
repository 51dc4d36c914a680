"""`python -m nunchaku_lite ...` runs the command line (see nunchaku_lite.cli)."""
import sys

from .cli import main

sys.exit(main())

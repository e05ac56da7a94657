"""``python -m moco_xla.eval``: see command.py."""
import sys

from .command import main

sys.exit(main())

"""``python -m moco_xla.bench``."""
import sys

from .cli import main

sys.exit(main())

"""``python -m benchmarks.coverage``: see ``benchmarks/coverage/run.py``."""
import sys

from .run import main

sys.exit(main())

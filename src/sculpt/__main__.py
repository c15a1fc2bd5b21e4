"""``python -m sculpt`` (also what ``accelerate launch -m sculpt`` runs)."""

import sys

from .cli import main

sys.exit(main())

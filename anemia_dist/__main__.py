"""``python -m anemia_dist``: the same command line as ``anemia-dist`` (what ``accelerate launch -m`` runs)."""

import sys

from .cli import main

sys.exit(main())

"""``python -m csi`` runs the elv command line."""

import sys

from csi.cli import main

sys.exit(main())

"""``python -m refnorm`` runs the command line interface."""

import sys

from refnorm.cli import main

sys.exit(main())

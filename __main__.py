"""``python -m flashtier`` runs the CLI."""

import sys

from flashtier.apps.cli import main

sys.exit(main())

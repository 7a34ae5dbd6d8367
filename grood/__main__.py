"""``python -m grood`` runs the ``grood`` command."""

import sys

from grood.cli import main

sys.exit(main())

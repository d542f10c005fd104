"""``python -m visiontune`` (also what ``torchrun -m visiontune`` runs)."""

import sys

from visiontune.cli import main

sys.exit(main())

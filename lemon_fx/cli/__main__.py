"""``python -m lemon_fx.cli``."""

import sys

from lemon_fx.cli.main import main

sys.exit(main())

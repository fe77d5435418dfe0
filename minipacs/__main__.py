"""`python -m minipacs` runs the command line."""

import sys

from minipacs.cli import main

sys.exit(main())

"""`python -m minipacs` runs the command line."""

import sys

from minipacs.cli import main

if __name__ == "__main__":
    sys.exit(main())

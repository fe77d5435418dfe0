"""`python -m minipacs` and the `minipacs` console script: run the command line."""

import sys

from minipacs.shutdown import stop_signals


def main() -> int:
    """Run the command line; `serve` catches SIGTERM/SIGINT before its ~0.5 s of imports."""
    if sys.argv[1:2] == ["serve"]:
        stop_signals.install()
    from minipacs.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())

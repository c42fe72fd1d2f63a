"""nbankd command line (placeholder until the daemon lands)."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("nbankd: not implemented yet", file=sys.stderr)
    return 2

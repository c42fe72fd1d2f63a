"""nbankctl command line (placeholder until the nbankctl issue lands)."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("nbankctl: not implemented yet", file=sys.stderr)
    return 2

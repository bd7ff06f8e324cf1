"""``python -m eval.verify``: the documented command line of the ``.bin`` verification CLI,
kept as a thin alias of :mod:`eval.verify_bin` (where the code lives)."""
import sys

from eval.verify_bin import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())

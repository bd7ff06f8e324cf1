"""``python -m data_tools <command>``: dataset tools (each command has ``--help``)."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from data_tools import folder2rec, make_bin, rec2folder, shuffle, synth, validate

COMMANDS = (folder2rec, rec2folder, shuffle, validate, make_bin, synth)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_tools",
        description="Make face datasets train-ready: RecordIO packing, checks, verification .bin, synthetic data.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in COMMANDS:
        mod.add_parser(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

"""``unpg-eval <command> ...``: the evaluation command lines under one name.

    unpg-eval verify  --model run_dir --bin lfw.bin cfp_fp.bin     (= python -m eval.verify, code: eval/verify_bin.py)
    unpg-eval ijb     --model run_dir --root IJB_release/IJBC      (= python -m eval.ijb)
    unpg-eval export-onnx --model model.pt --network r100 --out model.onnx   (= python -m eval.export_onnx)
"""
from __future__ import annotations

import importlib
import sys
from typing import List, Optional

COMMANDS = {"verify": "eval.verify_bin", "ijb": "eval.ijb", "export-onnx": "eval.export_onnx"}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"unknown command {argv[0]!r}; choose from: {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())

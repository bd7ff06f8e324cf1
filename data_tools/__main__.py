"""``python -m data_tools <command> ...`` (see ``--help``)."""
import sys

from data_tools.cli import main

sys.exit(main())

#!/usr/bin/env python3
"""The `train.py` command line of a checkout; the code is schp/commands/train.py (installed: schp-train)."""
import sys

from schp.commands.train import main

if __name__ == "__main__":
    sys.exit(main())

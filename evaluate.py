#!/usr/bin/env python3
"""The `evaluate.py` command line of a checkout; the code is schp/commands/evaluate.py (installed: schp-evaluate)."""
import sys

from schp.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The `serve.py` command line of a checkout; the code is schp/commands/serve.py (installed: schp-serve)."""
import sys

from schp.commands.serve import main

if __name__ == "__main__":
    sys.exit(main())

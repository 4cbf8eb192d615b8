#!/usr/bin/env python3
"""The `export.py` command line of a checkout; the code is schp/commands/export.py (installed: schp-export)."""
from schp.commands.export import main

if __name__ == "__main__":
    from schp.commands.console import exit_with
    exit_with(main)

#!/usr/bin/env python3
"""The `simple_extractor.py` command line of a checkout; the code is schp/commands/extract.py (installed: schp-extract)."""
from schp.commands.extract import main

if __name__ == "__main__":
    from schp.commands.console import exit_with
    exit_with(main)

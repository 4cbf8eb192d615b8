#!/usr/bin/env python3
"""The `evaluate.py` command line of a checkout; the code is schp/commands/evaluate.py (installed: schp-evaluate)."""
from schp.commands.evaluate import main

if __name__ == "__main__":
    from schp.commands.console import exit_with
    exit_with(main)

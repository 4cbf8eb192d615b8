#!/usr/bin/env python3
"""The `train.py` command line of a checkout; the code is schp/commands/train.py (installed: schp-train)."""
from schp.commands.train import main

if __name__ == "__main__":
    from schp.commands.console import exit_with
    exit_with(main)

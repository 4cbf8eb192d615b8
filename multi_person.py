#!/usr/bin/env python3
"""The `multi_person.py` command line of a checkout; the code is schp/commands/multi_person.py (installed: schp-multi-person)."""
from schp.commands.multi_person import main

if __name__ == "__main__":
    from schp.commands.console import exit_with
    exit_with(main)

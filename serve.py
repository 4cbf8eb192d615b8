#!/usr/bin/env python3
"""SCHP parsing service: `python serve.py --model-restore CKPT [--host 127.0.0.1 --port 8000]`.

The body is schp/service/command.py; see docs/service.md.
"""
import sys

from schp.service.command import main

if __name__ == "__main__":
    sys.exit(main())

"""The SCHP engine: checkpoints, the parsing model at inference (with test-time augmentation), the run loop.

Commands (simple_extractor.py, evaluate.py, train.py, export.py, multi_person.py) call into this
package; it builds on `datasets` and `networks`, which build on the small helpers in `utils`.
The Python API is `schp.SCHP` (schp/api.py), imported on first use so `import schp` stays light.
"""

__version__ = "1.1.0"


def __getattr__(name):
    if name in ("SCHP", "to_bgr", "load_parser"):
        from schp import api
        return getattr(api, name)
    raise AttributeError(f"module 'schp' has no attribute {name!r}")


__all__ = ["SCHP"]


def __dir__():
    return sorted(list(globals()) + __all__)

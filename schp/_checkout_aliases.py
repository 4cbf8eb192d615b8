"""The checkout's historical import paths (`networks`, `datasets`, `utils`) as aliases of the package's.

The installed code lives only under `schp` (so no generic top-level name lands in site-packages); a
checkout keeps `from networks import init_model` and `import utils.transforms` working through the
small packages at its root, which call `alias`. An alias is the same module object as the real one,
so classes and module state are never duplicated.
"""
import importlib
import importlib.abc
import importlib.util
import sys


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports `old.x.y` as the already importable `new.x.y`."""

    def __init__(self, old: str, new: str):
        self.old, self.new = old, new

    def find_spec(self, name, path=None, target=None):
        if name.startswith(self.old + "."):
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        module = importlib.import_module(self.new + spec.name[len(self.old):])
        self._real_spec = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self._real_spec  # the import system set the alias's spec on the real module


def alias(old: str, new: str):
    """Make `old` (a checkout package being imported) and its submodules the modules of `new`."""
    if not any(isinstance(f, _Alias) and f.old == old for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias(old, new))
    module = importlib.import_module(new)
    sys.modules[old] = module
    return module

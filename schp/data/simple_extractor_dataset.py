"""The original's module name for the extractor's input dataset (now schp.data.crop and schp.data.decode)."""
from schp.data.crop import SimpleFolderDataset  # noqa: F401

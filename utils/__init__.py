"""Helpers of the SCHP extractor: geometry, palette, checkpoints, inference, outputs."""

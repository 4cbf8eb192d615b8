"""Inputs of the SCHP extractor: dataset facts, image folders, IntegratedPIFu trees."""

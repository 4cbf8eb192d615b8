"""Multi-person parsing: person instances, a global and a local parser, and their fusion.

Every step after detection follows the released multi-person extension (crop and mask NMS, global and
local parsing, logits fusion); the detector is pluggable (instances.py).
"""

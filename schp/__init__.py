"""The SCHP engine: checkpoints, the parsing model at inference (with test-time augmentation), the run loop.

Commands (simple_extractor.py, evaluate.py, train.py, export.py, multi_person.py) call into this
package; it builds on `datasets` and `networks`, which build on the small helpers in `utils`.
"""

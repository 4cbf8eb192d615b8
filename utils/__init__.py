"""Crop geometry, palette, atomic outputs: the checkout's import path `utils`, an alias of `schp.utils` (where the code lives).

Kept so that scripts written for the original layout (`from utils... import ...`) run unchanged from a
checkout; installed code imports `schp.utils`.
"""
from schp._checkout_aliases import alias

alias(__name__, "schp.utils")

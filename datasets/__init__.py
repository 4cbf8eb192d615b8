"""Dataset facts, image reading, IntegratedPIFu trees, training data: the checkout's import path `datasets`, an alias of `schp.data` (where the code lives).

Kept so that scripts written for the original layout (`from datasets... import ...`) run unchanged from a
checkout; installed code imports `schp.data`.
"""
from schp._checkout_aliases import alias

alias(__name__, "schp.data")

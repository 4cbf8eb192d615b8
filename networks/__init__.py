"""The CE2P network: the checkout's import path `networks`, an alias of `schp.networks` (where the code lives).

Kept so that scripts written for the original layout (`from networks... import ...`) run unchanged from a
checkout; installed code imports `schp.networks`.
"""
from schp._checkout_aliases import alias

alias(__name__, "schp.networks")

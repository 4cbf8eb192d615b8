"""What every command line shares: its exit codes and the error that means "not started".

Exit codes: 0 all good, 1 some input failed (or the run was stopped), 2 usage or set-up error,
130 interrupted. Kept free of heavy imports so usage errors answer before torch is loaded.
"""
from schp.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_SETUP, SetupError  # noqa: F401


def parse_input_size(text: str, minimum: int):
    """`--input-size H,W` -> (H, W), each side at least `minimum`; SetupError naming the option otherwise."""
    try:
        h, w = (int(v) for v in str(text).split(","))
    except ValueError:
        h = w = None
    if h is None or min(h, w) < minimum:
        raise SetupError(f"--input-size {text}: expected H,W (each >= {minimum}), e.g. 473,473")
    return h, w

"""What every command line shares: its exit codes and the error that means "not started".

Exit codes: 0 all good, 1 some input failed (or the run was stopped), 2 usage or set-up error,
130 interrupted. Kept free of heavy imports so usage errors answer before torch is loaded.
"""
EXIT_OK, EXIT_FAILED, EXIT_SETUP, EXIT_INTERRUPTED = 0, 1, 2, 130


class SetupError(Exception):
    """A problem found before any work (bad arguments, missing folders, unusable checkpoint): one sentence."""

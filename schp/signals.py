"""Stop signals as Ctrl-C, for every run loop."""


def raise_keyboard_interrupt(signum, frame):
    """Signal handler: a stop signal (SIGTERM, SIGHUP) behaves as Ctrl-C."""
    raise KeyboardInterrupt

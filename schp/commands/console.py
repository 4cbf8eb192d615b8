"""What the commands show on the terminal: the run loop's lines and progress bars, on stderr.

The engine reports through schp.runs.loop.Reporter and stays silent; this is the printing one.
"""
import os
import sys
from typing import Iterable, Optional



class ConsoleReporter:
    """Lines and tqdm progress bars on stderr (no bars with quiet); lines never tear a bar."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet

    def line(self, text: str) -> None:
        from tqdm import tqdm
        tqdm.write(text, file=sys.stderr)

    def bar(self, total: Optional[int], initial: int = 0, unit: str = "img", desc: Optional[str] = None,
            leave: bool = True):
        from tqdm import tqdm
        return tqdm(total=total, initial=initial, unit=unit, desc=desc, file=sys.stderr, disable=self.quiet,
                    dynamic_ncols=True, leave=leave)


def emit(lines: Iterable[str]) -> None:
    """Print listing lines to stdout; a reader that stops early (`| head`) ends the listing quietly."""
    try:
        for line in lines:
            print(line)
        sys.stdout.flush()
    except BrokenPipeError:
        # nobody reads any more: point stdout at /dev/null so the interpreter's final flush is silent
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def interruptible(body, argv, flags=None) -> int:
    """Run a command's body with SIGTERM and SIGHUP acting as Ctrl-C from the first second on. An engine
    error is one line `error: ...` naming the command's flags (`flags`: parameter -> flag where they
    differ) and its exit code; a stop before any input (download, model build) is one line and 130."""
    from schp.commands.options import flag_message
    from schp.errors import EXIT_INTERRUPTED, SCHPError
    from schp.runs.loop import stop_signals_as_interrupt

    with stop_signals_as_interrupt():
        try:
            return body(argv)
        except SystemExit as stop:  # --help, --version, a usage error: its exit code, for callers of main()
            return stop.code
        except SCHPError as err:
            print(f"error: {flag_message(err, flags)}", file=sys.stderr)
            return err.exit_code
        except KeyboardInterrupt:
            print("interrupted before any input was processed", file=sys.stderr)
            return EXIT_INTERRUPTED


def exit_with(main) -> None:
    """A command's process entry point: sys.exit(main()), where a stop signal arriving once main's
    outcome is decided (its manifest written, its handlers restored) cannot turn it into a death by
    signal (exit -2 / 143): the outcome stands, and a signal before any outcome is exit 130."""
    import signal

    from schp.errors import EXIT_INTERRUPTED
    from schp.runs.loop import handled_signals, raise_keyboard_interrupt

    for s in handled_signals((signal.SIGTERM, signal.SIGHUP)):  # from the first line, as Ctrl-C
        signal.signal(s, raise_keyboard_interrupt)
    code = None
    try:
        code = main()
    except KeyboardInterrupt:
        pass
    finally:
        while True:  # until every stop signal is ignored; one landing meanwhile changes nothing
            try:
                for s in handled_signals():
                    signal.signal(s, signal.SIG_IGN)
                break
            except KeyboardInterrupt:
                continue
    sys.exit(EXIT_INTERRUPTED if code is None else code)


def _entry(module: str):
    """A console script (pyproject.toml) that starts `module`'s main through exit_with, as the checkout's
    scripts do."""
    def run() -> None:
        import importlib
        exit_with(importlib.import_module(module).main)
    return run


extract = _entry("schp.commands.extract")
multi_person = _entry("schp.commands.multi_person")
evaluate = _entry("schp.commands.evaluate")
export = _entry("schp.commands.export")
train = _entry("schp.commands.train")

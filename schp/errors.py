"""The engine's errors: one base class that carries the exit code a command ends with.

An error about a parameter names it as a Python caller wrote it (`device='tpu': expected ...`); the
commands re-word the same error with their flag (`--device tpu: expected ...`) through `describe`.
Kept free of imports so that commands can use it before anything heavy is loaded.
"""
from typing import Any, Callable, Dict, Optional

EXIT_OK, EXIT_FAILED, EXIT_SETUP, EXIT_INTERRUPTED = 0, 1, 2, 130


class _AboutParameter:
    """One sentence for the user; `parameter` / `value` name what was wrong where a caller passed it.

    The reason may mention other parameters as `{name}` with their values in `mentions` (`...` for
    none); they are named the same way as `parameter` (`dataset='pascal'`, or by a command
    `--dataset pascal`).
    """

    def __init__(self, reason: str, parameter: Optional[str] = None, value: Any = ...,
                 mentions: Optional[Dict[str, Any]] = None):
        self.reason, self.parameter, self.value = reason, parameter, value
        self.mentions = dict(mentions or {})
        super().__init__(self.describe())

    def describe(self, flag: Optional[str] = None, flags: Optional[Callable[[str], str]] = None) -> str:
        """The sentence, parameters named as Python (`name='value'`) or, by a command, as flags: `flag`
        for `parameter`, `flags(name)` for any (both given by the command)."""
        def shown(name: str, value: Any, as_flag: Optional[str]) -> str:
            if as_flag is None and flags is not None:
                as_flag = flags(name)
            if as_flag is not None:
                return as_flag if value is ... else f"{as_flag} {value}"
            return name if value is ... else f"{name}={value!r}"

        reason = self.reason
        if self.mentions:
            reason = reason.format(**{k: shown(k, v, None) for k, v in self.mentions.items()})
        if self.parameter is None:
            return reason
        return f"{shown(self.parameter, self.value, flag)}: {reason}"


class SCHPError(_AboutParameter, Exception):
    """The base of the engine's errors; `exit_code` is what a command ends with when it stops on one."""

    exit_code = EXIT_FAILED


class SetupError(SCHPError):
    """A problem found before any work (arguments, folders, checkpoint, device): nothing was started."""

    exit_code = EXIT_SETUP


class ParameterError(SetupError, ValueError):
    """A parameter value the engine cannot take (device, precision, scales, backend, ...); also a
    ValueError, which is what Python callers catch for a bad argument."""


class SCHPWarning(_AboutParameter, UserWarning):
    """The engine's warnings (through `warnings.warn`); the commands show them as `warning: ...`."""


def describe_exception(err: BaseException) -> str:
    """One line for an unexpected exception: its type and the first line of its message (OpenCV's
    assertion text comes last, on its own line)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = next((line for line in lines if "error:" in line), lines[0] if lines else "")
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
